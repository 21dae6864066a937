//! Id newtypes, so a job id cannot be passed where a worker id is expected.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! uuid_id {
    ($name:ident, $what:literal) => {
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        pub struct $name(pub uuid::Uuid);

        impl $name {
            pub fn new() -> Self {
                $name(uuid::Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                uuid::Uuid::parse_str(s.trim())
                    .map($name)
                    .map_err(|_| format!("{s:?} is not a valid {} (expected a UUID)", $what))
            }
        }
    };
}

uuid_id!(JobId, "job id");
uuid_id!(WorkerId, "worker id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_roundtrip_and_errors() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        let e = "nope".parse::<WorkerId>().unwrap_err();
        assert!(e.contains("worker id"));
    }
}
