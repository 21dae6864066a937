//! Network helpers shared by the daemon and the coordinator.

/// A port range that is not one, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PortRangeError {
    pub field: &'static str,
    pub message: String,
}

/// Checks a range of TCP ports `[start, end)`: non-empty, `start` in 1..=65535, `end` at most
/// 65536. The one definition, for the daemon's configuration and its registration alike.
pub fn check_port_range(start: u32, end: u32) -> Result<(), PortRangeError> {
    if start == 0 || start > 65535 {
        return Err(PortRangeError {
            field: "port_range_start",
            message: "must be in 1..=65535".into(),
        });
    }
    if end <= start || end > 65536 {
        return Err(PortRangeError {
            field: "port_range_end",
            message: format!(
                "must be greater than port_range_start ({start}) and at most 65536 (the range is \
                 [start, end))"
            ),
        });
    }
    Ok(())
}

/// A TCP port on loopback that was free a moment ago (bound to port 0, read, released): for tests
/// and local clusters that must name a port before the process that listens on it starts.
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        check_port_range(29500, 29600).unwrap();
        check_port_range(65535, 65536).unwrap();
        assert_eq!(
            check_port_range(0, 10).unwrap_err().field,
            "port_range_start"
        );
        assert_eq!(
            check_port_range(70000, 70001).unwrap_err().field,
            "port_range_start"
        );
        assert_eq!(
            check_port_range(10, 10).unwrap_err().field,
            "port_range_end"
        );
        assert_eq!(
            check_port_range(10, 65537).unwrap_err().field,
            "port_range_end"
        );
    }
}
