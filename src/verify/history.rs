//! Recorded histories: what each client asked, when, and what it saw.
//!
//! A [`Recorder`] is shared by every client task; each operation is stamped
//! with its invocation time before it is sent and its completion time when the
//! answer arrives, on one monotonic clock. An operation whose answer never
//! came (a timeout, a lost connection) keeps `ret == None`: its outcome is
//! unknown, and the checker lets it take effect at any time after its call,
//! or never.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// A request a client sent to the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Read a key.
    Get { key: Vec<u8> },
    /// Set a key to a value.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Remove a key (absent afterwards, whether or not it existed).
    Delete { key: Vec<u8> },
    /// Compare-and-swap: if the key's current value equals `expected` (`None`:
    /// the key must be absent), set it to `new` (`None`: delete it).
    Cas {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
}

impl Input {
    /// A `Get` of `key`.
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Input::Get { key: key.into() }
    }

    /// A `Put` of `value` at `key`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Input::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// A `Delete` of `key`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Input::Delete { key: key.into() }
    }

    /// A `Cas` on `key` from `expected` to `new` (`None` = absent).
    pub fn cas(key: impl Into<Vec<u8>>, expected: Option<&[u8]>, new: Option<&[u8]>) -> Self {
        Input::Cas {
            key: key.into(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        }
    }

    /// The key the request touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Input::Get { key } | Input::Put { key, .. } | Input::Delete { key } => key,
            Input::Cas { key, .. } => key,
        }
    }
}

/// The result a client observed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// Result of a `Get`: the value, or `None` if the key was absent.
    Get(Option<Vec<u8>>),
    /// A `Put` or `Delete` was acknowledged.
    Write,
    /// Result of a `Cas`: whether the swap happened.
    Cas(bool),
}

/// One operation of a recorded history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Which client issued it (only used in messages).
    pub client: u64,
    /// What was asked.
    pub input: Input,
    /// Invocation time in nanoseconds from any common origin.
    pub call: u64,
    /// Completion time on the same clock; `None` when the outcome is unknown
    /// (timeout, crash): the operation may or may not have taken effect, at
    /// any time after `call`.
    pub ret: Option<u64>,
    /// The observed result; ignored when `ret` is `None`.
    pub output: Output,
}

// ---------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------

/// Bytes as a quoted, escaped UTF-8 (lossy) string.
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.0))
    }
}

/// A value or `absent`.
pub(crate) struct MaybeBytes<'a>(pub(crate) Option<&'a [u8]>);

impl fmt::Display for MaybeBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => Bytes(v).fmt(f),
            None => f.write_str("absent"),
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Get { key } => write!(f, "get({})", Bytes(key)),
            Input::Put { key, value } => write!(f, "put({}, {})", Bytes(key), Bytes(value)),
            Input::Delete { key } => write!(f, "delete({})", Bytes(key)),
            Input::Cas { key, expected, new } => write!(
                f,
                "cas({}, {} -> {})",
                Bytes(key),
                MaybeBytes(expected.as_deref()),
                MaybeBytes(new.as_deref())
            ),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Get(v) => MaybeBytes(v.as_deref()).fmt(f),
            Output::Write => f.write_str("ok"),
            Output::Cas(true) => f.write_str("swapped"),
            Output::Cas(false) => f.write_str("not swapped"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {:<4} [{:>12} .. ", self.client, self.call)?;
        match self.ret {
            Some(ret) => write!(f, "{ret:>12}] {} -> {}", self.input, self.output),
            None => write!(f, "{:>12}] {} -> unknown", "?", self.input),
        }
    }
}

// ---------------------------------------------------------------------------
// Recording
// ---------------------------------------------------------------------------

/// Records a history from many clients. Clones share one history and one
/// clock origin, so hand a clone to every task or thread.
#[derive(Clone, Debug)]
pub struct Recorder {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    origin: Instant,
    ops: Mutex<Vec<Operation>>,
}

/// An invoked operation awaiting its result. Dropping it without
/// [`Recorder::complete`] leaves the outcome unknown, like
/// [`Recorder::unknown`].
#[derive(Debug)]
#[must_use = "pass the handle to Recorder::complete or Recorder::unknown"]
pub struct OpHandle {
    index: usize,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        Recorder {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                ops: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Records that `client` is about to send `input`. Call it before sending.
    pub fn invoke(&self, client: u64, input: Input) -> OpHandle {
        // Stamped before taking the lock: waiting for it only widens the
        // interval, which can hide but never invent a violation.
        let call = self.now();
        let mut ops = self.lock();
        ops.push(Operation {
            client,
            input,
            call,
            ret: None,
            // Placeholder; ignored while `ret` is None.
            output: Output::Write,
        });
        OpHandle {
            index: ops.len() - 1,
        }
    }

    /// Records the result the client received.
    pub fn complete(&self, handle: OpHandle, output: Output) {
        let ret = self.now(); // before the lock, as in `invoke`
        if let Some(op) = self.lock().get_mut(handle.index) {
            op.ret = Some(ret);
            op.output = output;
        }
    }

    /// Records that the outcome is unknown (timeout, lost connection): the
    /// operation may take effect at any later time, or never.
    pub fn unknown(&self, handle: OpHandle) {
        drop(handle); // `ret` stays None
    }

    /// A copy of the history so far.
    pub fn snapshot(&self) -> Vec<Operation> {
        self.lock().clone()
    }

    /// The recorded history (copied if other clones are still alive).
    pub fn into_history(self) -> Vec<Operation> {
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared
                .ops
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
            Err(shared) => shared
                .ops
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.shared.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A panicking client thread must not make the rest of the history unreadable.
    fn lock(&self) -> MutexGuard<'_, Vec<Operation>> {
        self.shared
            .ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_collects_from_threads() {
        let recorder = Recorder::new();
        let threads: Vec<_> = (0..4u64)
            .map(|client| {
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    for i in 0..25u64 {
                        let key = format!("k{client}");
                        let h = recorder.invoke(client, Input::put(key.as_str(), i.to_string()));
                        recorder.complete(h, Output::Write);
                        let h = recorder.invoke(client, Input::get(key.as_str()));
                        recorder.complete(h, Output::Get(Some(i.to_string().into_bytes())));
                    }
                    let h = recorder.invoke(client, Input::put("shared", "lost"));
                    recorder.unknown(h);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client thread");
        }
        assert_eq!(recorder.snapshot().len(), 4 * 51);
        let history = recorder.into_history();
        assert_eq!(history.len(), 4 * 51);
        for op in &history {
            match op.input {
                Input::Put { ref key, .. } if key == b"shared" => assert_eq!(op.ret, None),
                _ => assert!(op.ret.is_some_and(|r| r >= op.call), "{op}"),
            }
        }
        let verdict = crate::verify::check(&history);
        assert!(verdict.is_ok(), "{verdict}");
    }
}
