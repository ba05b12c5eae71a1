//! Sparse logistic regression: data, model, evaluation (being written).
