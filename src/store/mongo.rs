//! The MongoDB backend (filled in by the MongoDB issue).

use std::time::Duration;

use super::{Store, StoreError};

pub struct MongoStore;

impl MongoStore {
    pub fn connect(
        _uri: &str,
        _database: &str,
        _timeout: Duration,
    ) -> Result<Box<dyn Store>, StoreError> {
        Err(StoreError::Unavailable(
            "MongoDB backend not built yet".into(),
        ))
    }
}
