//! Versioned blocks (seqlock) for one-sided readers: in progress.
