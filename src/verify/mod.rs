//! Checking a live cluster for linearizability, as Jepsen does: record what
//! concurrent clients asked and saw, then search for an order that explains it.
//!
//! * [`history`]: the [`Recorder`] and the operations it records.
//! * [`checker`]: [`check`], the WGL linearizability search, which also shrinks a
//!   violation to a small offending history.
//! * [`workload`]: recorded concurrent clients over the product [`crate::client::Client`].
//!
//! `shardctl verify` runs all three against a cluster; the end-to-end fault tests
//! use them too.
//!
//! ```
//! use shardkv::verify::{check, Input, Output, Recorder};
//!
//! let recorder = Recorder::new(); // clone it into every client task
//! let put = recorder.invoke(1, Input::put("x", "1"));
//! // ... send the request, await the reply ...
//! recorder.complete(put, Output::Write);
//! let get = recorder.invoke(2, Input::get("x"));
//! recorder.complete(get, Output::Get(None)); // stale: the put had completed
//!
//! let result = check(&recorder.into_history());
//! assert!(result.violation().is_some());
//! println!("{result}"); // the key and the offending ops, one per line
//! ```

pub mod checker;
pub mod history;
pub mod workload;

pub use checker::{check, check_with_limits, CheckResult, Limits, Violation};
pub use history::{Input, OpHandle, Operation, Output, Recorder};
