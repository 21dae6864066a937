//! shared types
