//! The operator's view of a box: its logs (format, files, reading and following),
//! a short history for the status page's charts, the support bundle, and the
//! `pos-hub logs` / `pos-hub support-bundle` commands. Knows nothing of HTTP routes
//! or realms: `http` gathers what goes in and calls these.

pub mod bundle;
pub mod cmd;
pub mod history;
pub mod logs;
