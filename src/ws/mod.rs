//! WebSocket: the upgrade (`handshake`), the frame codec (`frame`), message reassembly
//! (`reader`) and the connection task that ties them to a socket (`conn`). Everything
//! but `conn` is pure. What a connection is sent lives with the shard
//! (`shard::outbound`), so fan-out never reaches into this module.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod reader;
