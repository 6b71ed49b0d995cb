//! The wire protocol of docs/PROTOCOL.md: request decoding, reply encoding and error codes.

pub mod errors;
pub mod reply;
pub mod request;

pub use errors::{ErrorCode, EventError, Failure, ProtocolError};
pub use reply::{encode_broadcast, encode_failure, encode_line, hello_data, HelloInfo};
pub use request::{decode_envelope, Envelope, RequestId};
