//! WebSocket: the upgrade (`handshake`), the frame codec (`frame`), message reassembly
//! (`reader`), the per-connection send queue (`outbound`) and the connection task that
//! ties them to a socket (`conn`). Everything but `conn` is pure.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod outbound;
pub mod reader;
