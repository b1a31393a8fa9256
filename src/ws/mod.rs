//! WebSocket: the upgrade (`handshake`), the frame codec (`frame`), message reassembly
//! (`reader`), the connection's protocol state machine (`session`) and the connection
//! task that ties them to a socket and the shard (`conn`). Everything but `conn` is
//! pure. What a connection is sent lives with the shard
//! (`shard::outbound`), so fan-out never reaches into this module.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod reader;
pub mod session;
