//! Why a record was not accepted: every dead letter carries one of these.

use std::fmt;

/// The reason a record went to the dead-letter output. [`RejectReason::code`] is the stable
/// string stored in `dead_letters.reason` and used as a metric label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not valid JSON, or not a JSON object.
    MalformedJson,
    /// A required field is absent or null.
    MissingField(&'static str),
    /// A field is present with a value of the wrong type or out of its range.
    BadField(&'static str),
    BadTimestamp,
    BadDirection,
    UnknownCheckpoint,
    /// Further in the future than the allowed clock skew.
    FutureTimestamp,
    /// A resend whose content differs from the first copy.
    ConflictingDuplicate,
}

impl RejectReason {
    /// Every `kind`, for metric labels known in advance.
    pub const KINDS: [&'static str; 8] = [
        "malformed_json",
        "missing_field",
        "bad_field",
        "bad_timestamp",
        "bad_direction",
        "unknown_checkpoint",
        "future_timestamp",
        "conflicting_duplicate",
    ];

    pub fn code(&self) -> String {
        match self {
            RejectReason::MalformedJson => "malformed_json".into(),
            RejectReason::MissingField(name) => format!("missing_field:{name}"),
            RejectReason::BadField(name) => format!("bad_field:{name}"),
            RejectReason::BadTimestamp => "bad_timestamp".into(),
            RejectReason::BadDirection => "bad_direction".into(),
            RejectReason::UnknownCheckpoint => "unknown_checkpoint".into(),
            RejectReason::FutureTimestamp => "future_timestamp".into(),
            RejectReason::ConflictingDuplicate => "conflicting_duplicate".into(),
        }
    }

    /// The reason without its field name: a bounded set, fit for a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::MissingField(_) => "missing_field",
            RejectReason::BadField(_) => "bad_field",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::BadDirection => "bad_direction",
            RejectReason::UnknownCheckpoint => "unknown_checkpoint",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::ConflictingDuplicate => "conflicting_duplicate",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code())
    }
}
