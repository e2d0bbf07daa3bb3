//! The native backend: Linux namespaces, a read-only root, cgroups, seccomp and Landlock.

pub mod caps;
pub mod cgroup;
pub mod landlock;
pub mod seccomp;
