//! WebSocket: the upgrade (`handshake`), the frame codec (`frame`), message reassembly
//! (`reader`), the connection's protocol state machine (`session`), the I/O shell that
//! ties them to a socket and the shard (`conn`), and the shard's reactor that reads and
//! writes every established connection (`reactor`). Everything but `conn` and
//! `reactor` is pure. What a connection is sent lives with the shard
//! (`shard::outbound`), so fan-out never reaches into this module.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod proxy;
pub mod reactor;
pub mod reader;
pub mod session;
