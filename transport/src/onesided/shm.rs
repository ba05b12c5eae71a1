//! The shared-memory backend of [`super::OneSided`]: in progress.
