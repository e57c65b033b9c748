//! Local ranks: child processes of the launcher, each in its own process group.
