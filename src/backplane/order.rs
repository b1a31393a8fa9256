//! The command link's bookkeeping across masters, without I/O: which master each
//! command went to (`Route` through the slot map), the replies gathered back into the
//! order the commands were written, and what must be sent again: a command answered
//! `MOVED` or `ASK` to a master the link holds (after `ASKING` for an `ASK`), or
//! `TRYAGAIN` (a multi-key command while its slot migrates), after a short wait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;

use super::cluster::{Redirect, SlotMap};
use super::link::{self, LinkError};
use super::masters::Route;
use super::url::Addr;

/// Redirects one command may follow before the link gives up on it and reconnects.
const MAX_REDIRECTS: u8 = 5;
/// A command answered `TRYAGAIN` (or `ASK` to a master the link does not hold yet: a
/// new one importing its first slot) is sent again from the start after this, up to
/// `MAX_TRIES` times, after which its error is its answer.
const TRY_AGAIN_AFTER: Duration = Duration::from_millis(100);
/// 5 s of tries: the answer comes before the reply timeout (10 s) breaks the link.
const MAX_TRIES: u8 = 50;

/// A command written and not yet answered.
struct Ticket {
    bytes: Bytes,
    slot: Option<u16>,
    /// Replies still to come (one per master for `All`).
    left: usize,
    reply: Option<BytesFrame>,
    redirects: u8,
    tries: u8,
}

/// What one of a connection's next replies answers.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The command with this sequence number.
    Reply(u64),
    /// An `ASKING` written before a redirected command: its `OK` is dropped.
    Asking,
}

pub struct Order {
    map: SlotMap,
    /// The address of each connection (by index), to follow redirections.
    addrs: Vec<Addr>,
    /// Commands in the order written; `tickets[0]` has sequence number `base`.
    tickets: VecDeque<Ticket>,
    base: u64,
    /// Per connection, what its next replies answer, in order.
    expect: Vec<VecDeque<Expect>>,
    /// Per connection, what to write next, in the order its replies are expected:
    /// commands issued and commands sent again. Taken by `take_writes`.
    out: Vec<BytesMut>,
    /// Commands (by sequence number) to send again from the start, once due.
    retry: VecDeque<(Instant, u64)>,
    /// A Redis Cluster: redirections are followed (and commands kept until answered
    /// for that). A single Redis answering `MOVED` is a cluster node named with
    /// `redis://`: the error is the answer.
    cluster: bool,
}

impl Order {
    /// Connection `i` is to the master at `addrs[i]`.
    pub fn new(map: SlotMap, addrs: Vec<Addr>, cluster: bool) -> Self {
        let n = addrs.len();
        Self {
            map,
            addrs,
            tickets: VecDeque::new(),
            base: 0,
            expect: vec![VecDeque::new(); n],
            out: vec![BytesMut::new(); n],
            retry: VecDeque::new(),
            cluster,
        }
    }

    /// Which connections a route takes.
    pub fn targets(&self, route: Route) -> Result<Vec<usize>, LinkError> {
        match route {
            Route::All => Ok((0..self.addrs.len()).collect()),
            Route::Slot(s) => match self.map.master_index(s) {
                Some(i) if i < self.addrs.len() => Ok(vec![i]),
                _ => Err(LinkError::SlotsMoved(format!(
                    "slot {s} has no master this link holds"
                ))),
            },
        }
    }

    /// A command to write to the master (or masters) of its route, after whatever
    /// waits to be written there.
    pub fn issue(&mut self, bytes: Bytes, route: Route) -> Result<(), LinkError> {
        let targets = self.targets(route)?;
        let seq = self.base + self.tickets.len() as u64;
        for &t in &targets {
            self.expect[t].push_back(Expect::Reply(seq));
            self.out[t].extend_from_slice(&bytes);
        }
        let (bytes, slot) = match route {
            Route::Slot(s) if self.cluster => (bytes, Some(s)),
            _ => (Bytes::new(), None),
        };
        self.tickets.push_back(Ticket {
            bytes,
            slot,
            left: targets.len(),
            reply: None,
            redirects: 0,
            tries: 0,
        });
        Ok(())
    }

    /// A reply from connection `i`: to its command (for `All`, the first error wins,
    /// else the smallest integer, else the first reply), or a redirection to follow. An error when the link
    /// cannot follow it and must read the topology again.
    pub fn answered(&mut self, i: usize, frame: BytesFrame) -> Result<(), LinkError> {
        let seq = match self.expect.get_mut(i).and_then(VecDeque::pop_front) {
            Some(Expect::Reply(seq)) => seq,
            Some(Expect::Asking) => return Ok(()),
            None => return Err(LinkError::Protocol("reply without a command".into())),
        };
        let Some(ticket) = seq
            .checked_sub(self.base)
            .and_then(|at| self.tickets.get_mut(at as usize))
        else {
            return Err(LinkError::Protocol(
                "reply to a command already answered".into(),
            ));
        };
        if let (BytesFrame::Error(e), Some(_)) = (&frame, ticket.slot) {
            let redirect = Redirect::parse(e);
            // Where a redirect points, if this link holds that master.
            let to = redirect.as_ref().and_then(|r| {
                let (Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. }) = r;
                self.addrs.iter().position(|a| a == addr)
            });
            let unheld_ask = matches!(redirect, Some(Redirect::Ask { .. })) && to.is_none();
            if (e.starts_with("TRYAGAIN") || unheld_ask) && ticket.tries < MAX_TRIES {
                ticket.tries += 1;
                ticket.redirects = 0;
                self.retry
                    .push_back((Instant::now() + TRY_AGAIN_AFTER, seq));
                return Ok(());
            }
            if let Some(redirect) = redirect {
                if ticket.redirects >= MAX_REDIRECTS {
                    return Err(LinkError::SlotsMoved(format!(
                        "redirected {MAX_REDIRECTS} times: {e}"
                    )));
                }
                let Some(to) = to else {
                    return Err(LinkError::SlotsMoved(e.to_string()));
                };
                ticket.redirects += 1;
                let bytes = ticket.bytes.clone();
                match redirect {
                    Redirect::Moved { slot, addr } => self.map.moved(slot, &addr),
                    Redirect::Ask { .. } => {
                        link::encode(&mut self.out[to], &[b"ASKING"]);
                        self.expect[to].push_back(Expect::Asking);
                    }
                }
                self.out[to].extend_from_slice(&bytes);
                self.expect[to].push_back(Expect::Reply(seq));
                return Ok(());
            }
        }
        ticket.left = ticket.left.saturating_sub(1);
        let replace = match (&ticket.reply, &frame) {
            (None, _) => true,
            (Some(BytesFrame::Error(_)), _) => false,
            (Some(_), BytesFrame::Error(_)) => true,
            // A version asked of every master: the oldest decides.
            (Some(BytesFrame::Integer(kept)), BytesFrame::Integer(new)) => new < kept,
            _ => false,
        };
        if replace {
            ticket.reply = Some(frame);
        }
        Ok(())
    }

    /// The reply to the oldest command not yet handed out, once every master it went
    /// to has answered.
    pub fn next_reply(&mut self) -> Option<BytesFrame> {
        match self.tickets.front() {
            Some(t) if t.left == 0 => {
                self.base += 1;
                self.tickets.pop_front().and_then(|t| t.reply)
            }
            _ => None,
        }
    }

    /// What to write now, per connection, in the order the replies are expected:
    /// commands issued, redirected, and the retries due at `now` (sent to their slot's
    /// master as the map says now).
    pub fn take_writes(&mut self, now: Instant) -> Result<Vec<BytesMut>, LinkError> {
        while let Some(&(at, seq)) = self.retry.front() {
            if at > now {
                break;
            }
            self.retry.pop_front();
            let Some(t) = seq
                .checked_sub(self.base)
                .and_then(|at| self.tickets.get(at as usize))
            else {
                continue;
            };
            let route = t.slot.map_or(Route::All, Route::Slot);
            let bytes = t.bytes.clone();
            for to in self.targets(route)? {
                self.out[to].extend_from_slice(&bytes);
                self.expect[to].push_back(Expect::Reply(seq));
            }
        }
        let n = self.out.len();
        Ok(std::mem::replace(&mut self.out, vec![BytesMut::new(); n]))
    }

    /// Whether commands wait to be written, or retries are due at `now`.
    pub fn must_flush(&self, now: Instant) -> bool {
        self.out.iter().any(|b| !b.is_empty())
            || self.retry.front().is_some_and(|(at, _)| *at <= now)
    }

    /// How long from `now` until the next retry is due, if one waits.
    pub fn next_retry(&self, now: Instant) -> Option<Duration> {
        self.retry
            .front()
            .map(|(at, _)| at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::cluster::slot;

    fn addr(port: u16) -> Addr {
        Addr {
            host: "10.0.0.1".into(),
            port,
        }
    }

    /// Two masters: slot of `{a}` on the first, every other slot on the second.
    fn two() -> Order {
        let mut map = SlotMap::single(addr(7001));
        let a = slot(b"{a}");
        map.moved(a, &addr(7000));
        // Index 0 is 7001 (everything), index 1 is 7000 (slot a).
        assert_eq!(map.master_index(a), Some(1));
        Order::new(map, vec![addr(7001), addr(7000)], true)
    }

    fn ok(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn err(s: &str) -> BytesFrame {
        BytesFrame::Error(s.into())
    }

    /// Issues a command and takes what is to be written: the connections written to.
    fn send(o: &mut Order, what: &str, route: Route) -> Vec<usize> {
        o.issue(Bytes::copy_from_slice(what.as_bytes()), route)
            .unwrap();
        let out = o.take_writes(Instant::now()).unwrap();
        (0..out.len()).filter(|&i| !out[i].is_empty()).collect()
    }

    #[test]
    fn replies_come_back_in_the_order_written_whichever_master_answers_first() {
        let mut o = two();
        let a = Route::Slot(slot(b"{a}"));
        let b = Route::Slot(slot(b"{b}"));
        assert_eq!(send(&mut o, "1", a), vec![1]);
        assert_eq!(send(&mut o, "2", b), vec![0]);
        assert_eq!(send(&mut o, "3", a), vec![1]);
        o.answered(0, ok("two")).unwrap();
        assert_eq!(
            o.next_reply(),
            None,
            "the first command is not answered yet"
        );
        o.answered(1, ok("one")).unwrap();
        assert_eq!(o.next_reply(), Some(ok("one")));
        assert_eq!(o.next_reply(), Some(ok("two")));
        assert_eq!(o.next_reply(), None);
        o.answered(1, ok("three")).unwrap();
        assert_eq!(o.next_reply(), Some(ok("three")));
        assert!(matches!(
            o.answered(0, ok("?")),
            Err(LinkError::Protocol(_))
        ));
    }

    #[test]
    fn a_command_to_every_master_waits_for_all_and_keeps_the_first_error() {
        let mut o = two();
        assert_eq!(send(&mut o, "FUNCTION LOAD", Route::All), vec![0, 1]);
        o.answered(1, ok("fine")).unwrap();
        assert_eq!(o.next_reply(), None);
        o.answered(0, err("ERR refused")).unwrap();
        assert_eq!(o.next_reply(), Some(err("ERR refused")));
        send(&mut o, "PING", Route::All);
        o.answered(0, ok("PONG")).unwrap();
        o.answered(1, ok("PONG")).unwrap();
        assert_eq!(o.next_reply(), Some(ok("PONG")));
        // The public library's version: the oldest master's.
        send(&mut o, "FCALL ringway_version 0", Route::All);
        o.answered(0, BytesFrame::Integer(3)).unwrap();
        o.answered(1, BytesFrame::Integer(2)).unwrap();
        assert_eq!(o.next_reply(), Some(BytesFrame::Integer(2)));
    }

    #[test]
    fn moved_to_a_held_master_is_sent_there_and_the_map_follows() {
        let mut o = two();
        let b = slot(b"{b}");
        send(&mut o, "cmd", Route::Slot(b));
        o.answered(0, err(&format!("MOVED {b} 10.0.0.1:7000")))
            .unwrap();
        assert_eq!(o.next_reply(), None);
        assert!(o.must_flush(Instant::now()));
        let out = o.take_writes(Instant::now()).unwrap();
        assert_eq!((&out[0][..], &out[1][..]), (&b""[..], &b"cmd"[..]));
        assert!(!o.must_flush(Instant::now()));
        // The slot is the other master's from now on.
        assert_eq!(o.targets(Route::Slot(b)).unwrap(), vec![1]);
        o.answered(1, ok("done")).unwrap();
        assert_eq!(o.next_reply(), Some(ok("done")));
    }

    #[test]
    fn a_redirected_command_is_written_before_what_was_issued_after_it() {
        let mut o = two();
        let b = slot(b"{b}");
        let a = Route::Slot(slot(b"{a}"));
        send(&mut o, "first", Route::Slot(b));
        o.answered(0, err(&format!("MOVED {b} 10.0.0.1:7000")))
            .unwrap();
        // Issued before the redirection is written out: it goes after it, as its
        // reply is expected after it.
        o.issue(Bytes::from_static(b"second"), a).unwrap();
        let out = o.take_writes(Instant::now()).unwrap();
        assert_eq!(&out[1][..], b"firstsecond");
        o.answered(1, ok("1")).unwrap();
        o.answered(1, ok("2")).unwrap();
        assert_eq!(
            (o.next_reply(), o.next_reply()),
            (Some(ok("1")), Some(ok("2")))
        );
    }

    #[test]
    fn ask_to_a_master_not_held_yet_is_tried_again_later() {
        let mut o = two();
        let a = slot(b"{a}");
        send(&mut o, "cmd", Route::Slot(a));
        o.answered(1, err(&format!("ASK {a} 10.0.0.9:7009")))
            .unwrap();
        assert!(o.next_retry(Instant::now()).is_some());
        let out = o
            .take_writes(Instant::now() + Duration::from_secs(1))
            .unwrap();
        assert_eq!(&out[1][..], b"cmd");
    }

    #[test]
    fn ask_sends_asking_first_and_drops_its_ok() {
        let mut o = two();
        let a = slot(b"{a}");
        send(&mut o, "cmd", Route::Slot(a));
        o.answered(1, err(&format!("ASK {a} 10.0.0.1:7001")))
            .unwrap();
        let out = o.take_writes(Instant::now()).unwrap();
        assert_eq!(&out[0][..], b"*1\r\n$6\r\nASKING\r\ncmd");
        // ASK does not move the slot.
        assert_eq!(o.targets(Route::Slot(a)).unwrap(), vec![1]);
        o.answered(0, BytesFrame::SimpleString("OK".into()))
            .unwrap();
        assert_eq!(o.next_reply(), None);
        o.answered(0, ok("done")).unwrap();
        assert_eq!(o.next_reply(), Some(ok("done")));
    }

    #[test]
    fn a_redirect_the_link_cannot_follow_fails_it() {
        let mut o = two();
        let a = slot(b"{a}");
        send(&mut o, "cmd", Route::Slot(a));
        assert!(matches!(
            o.answered(1, err(&format!("MOVED {a} 10.0.0.9:7009"))),
            Err(LinkError::SlotsMoved(_))
        ));
        // A redirect loop ends too.
        let mut o = two();
        send(&mut o, "cmd", Route::Slot(a));
        let mut last = Ok(());
        for _ in 0..=MAX_REDIRECTS {
            last = o.answered(1, err(&format!("ASK {a} 10.0.0.1:7000")));
            if last.is_err() {
                break;
            }
            o.take_writes(Instant::now()).unwrap();
            o.answered(1, BytesFrame::SimpleString("OK".into()))
                .unwrap();
        }
        assert!(matches!(last, Err(LinkError::SlotsMoved(_))));
        // An error that is not a redirection is the command's answer.
        let mut o = two();
        send(&mut o, "cmd", Route::Slot(a));
        o.answered(1, err("ERR wrong")).unwrap();
        assert_eq!(o.next_reply(), Some(err("ERR wrong")));
    }

    #[test]
    fn a_single_redis_answering_moved_is_answered_with_the_error() {
        let mut o = Order::new(SlotMap::single(addr(6379)), vec![addr(6379)], false);
        send(&mut o, "cmd", Route::Slot(9));
        o.answered(0, err("MOVED 9 10.0.0.1:7000")).unwrap();
        assert_eq!(o.next_reply(), Some(err("MOVED 9 10.0.0.1:7000")));
        assert!(!o.must_flush(Instant::now()));
    }

    #[test]
    fn tryagain_is_sent_again_once_due_and_gives_up_in_the_end() {
        let mut o = two();
        let a = slot(b"{a}");
        send(&mut o, "cmd", Route::Slot(a));
        o.answered(
            1,
            err("TRYAGAIN Multiple keys request during rehashing of slot"),
        )
        .unwrap();
        let now = Instant::now();
        assert_eq!(o.next_reply(), None);
        assert!(!o.must_flush(now));
        assert!(o.next_retry(now).is_some_and(|d| d <= TRY_AGAIN_AFTER));
        let later = now + TRY_AGAIN_AFTER + Duration::from_millis(1);
        assert!(o.must_flush(later));
        let out = o.take_writes(later).unwrap();
        assert_eq!(&out[1][..], b"cmd");
        assert_eq!(o.next_retry(later), None);
        o.answered(1, ok("done")).unwrap();
        assert_eq!(o.next_reply(), Some(ok("done")));
        // Past MAX_TRIES the error is the answer.
        send(&mut o, "cmd", Route::Slot(a));
        for _ in 0..MAX_TRIES {
            o.answered(1, err("TRYAGAIN x")).unwrap();
            o.take_writes(Instant::now() + Duration::from_secs(20))
                .unwrap();
        }
        o.answered(1, err("TRYAGAIN x")).unwrap();
        assert_eq!(o.next_reply(), Some(err("TRYAGAIN x")));
    }
}
