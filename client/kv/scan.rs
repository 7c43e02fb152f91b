//! Scans: page by page across ranges and groups, following each page's `resume`.

use super::{check_key, Client, Error, Pair, MAX_SCAN_PAGE};
use crate::config::MAX_KEY_BYTES;
use crate::proto::ScanRequest;
use tonic::Code;

/// A scan in progress, page by page; made by [`Client::scan_pages`].
#[derive(Debug)]
pub struct Scanner {
    pub(super) client: Client,
    pub(super) cursor: ScanCursor,
    pub(super) page_size: u32,
}

impl Scanner {
    /// Asks for at most `page_size` pairs per request (1..=[`MAX_SCAN_PAGE`]).
    pub fn with_page_size(mut self, page_size: u32) -> Scanner {
        self.page_size = page_size.clamp(1, MAX_SCAN_PAGE);
        self
    }

    /// The next non-empty page of pairs in key order, or `None` when the scan is done.
    /// Each page is fetched within the call deadline; after an error, calling again
    /// retries the same page.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Pair>>, Error> {
        while let Some(request) = self.cursor.request(self.page_size)? {
            let (pairs, resume) = self.fetch(request).await?;
            let page = self.cursor.advance(pairs, resume)?;
            if !page.is_empty() {
                return Ok(Some(page));
            }
        }
        Ok(None)
    }

    /// The pages as a stream; it ends after the last page or the first error.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Vec<Pair>, Error>> + Send {
        futures::stream::unfold(Some(self), |scanner| async move {
            let mut scanner = scanner?;
            match scanner.next_page().await {
                Ok(Some(page)) => Some((Ok(page), Some(scanner))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// One scan request at the owner of its start; a reply too large to accept is
    /// asked for again with fewer pairs.
    async fn fetch(&mut self, request: ScanRequest) -> Result<(Vec<Pair>, Vec<u8>), Error> {
        let limit = std::sync::atomic::AtomicU32::new(request.limit);
        let start = request.start.clone();
        let reply = self
            .client
            .call(&start, "scan", |server| {
                let mut kv = server.kv;
                let mut request = request.clone();
                let limit = &limit;
                async move {
                    loop {
                        request.limit = limit.load(std::sync::atomic::Ordering::Relaxed);
                        match kv.scan(request.clone()).await {
                            Err(s) if s.code() == Code::OutOfRange && request.limit > 1 => {
                                limit.store(request.limit / 2, std::sync::atomic::Ordering::Relaxed)
                            }
                            result => return Ok(result?.into_inner()),
                        }
                    }
                }
            })
            .await?;
        let shrunk = limit.into_inner();
        if shrunk < self.page_size {
            self.page_size = shrunk.max(1);
        }
        let pairs = reply
            .pairs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        Ok((pairs, reply.resume))
    }
}

/// Pure scan bookkeeping: where the next request starts, and checks that the pages
/// the servers return fit together (in order, inside the scan, always advancing).
#[derive(Debug, Clone)]
pub(super) struct ScanCursor {
    /// Start of the next request; empty means the beginning of the key space.
    next: Vec<u8>,
    end: Vec<u8>,
    /// Pairs still wanted (`None`: no limit).
    remaining: Option<usize>,
    done: bool,
    /// Checked by the first request: an `end` not after `start` is refused.
    invalid: Option<Error>,
}

impl ScanCursor {
    pub(super) fn new(start: &[u8], end: &[u8], limit: usize) -> ScanCursor {
        let invalid = if !end.is_empty() && end <= start {
            Some(Error::invalid("end", "must be after start", 0))
        } else if start.len() > MAX_KEY_BYTES {
            check_key("start", start).err()
        } else {
            None
        };
        ScanCursor {
            next: start.to_vec(),
            end: end.to_vec(),
            remaining: (limit != 0).then_some(limit),
            done: false,
            invalid,
        }
    }

    /// The next request to send, or `None` when the scan is complete.
    fn request(&mut self, page_size: u32) -> Result<Option<ScanRequest>, Error> {
        if let Some(e) = self.invalid.take() {
            self.done = true;
            return Err(e);
        }
        if self.done || self.remaining == Some(0) {
            self.done = true;
            return Ok(None);
        }
        let start = self.next.clone();
        if !self.end.is_empty() && self.end <= start {
            self.done = true;
            return Ok(None);
        }
        let limit = match self.remaining {
            Some(r) => page_size.min(u32::try_from(r).unwrap_or(u32::MAX)),
            None => page_size,
        };
        Ok(Some(ScanRequest {
            start,
            end: self.end.clone(),
            limit,
        }))
    }

    /// Takes in a server's page; returns the pairs to hand out.
    fn advance(&mut self, mut pairs: Vec<Pair>, resume: Vec<u8>) -> Result<Vec<Pair>, Error> {
        let start = if self.next.is_empty() {
            vec![0]
        } else {
            self.next.clone()
        };
        let mut previous: Option<&[u8]> = None;
        for (key, _) in &pairs {
            let in_order = previous.is_none_or(|p| p < key.as_slice());
            let inside = key.as_slice() >= start.as_slice()
                && (self.end.is_empty() || key.as_slice() < self.end.as_slice());
            if !in_order || !inside {
                self.done = true;
                return Err(Error::Internal(format!(
                    "a scan page holds key {:?} out of order or outside the scan",
                    String::from_utf8_lossy(key)
                )));
            }
            previous = Some(key);
        }
        if let Some(remaining) = &mut self.remaining {
            pairs.truncate(*remaining);
            *remaining -= pairs.len();
        }
        if resume.is_empty() {
            self.done = true;
            return Ok(pairs);
        }
        let after_page = pairs
            .last()
            .is_none_or(|(k, _)| k.as_slice() < resume.as_slice());
        if resume <= start || !after_page {
            self.done = true;
            return Err(Error::Internal(format!(
                "a scan page says to resume at {:?}, which does not advance the scan",
                String::from_utf8_lossy(&resume)
            )));
        }
        self.next = resume;
        Ok(pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(keys: &[&str]) -> Vec<Pair> {
        keys.iter()
            .map(|k| (k.as_bytes().to_vec(), b"v".to_vec()))
            .collect()
    }

    /// Runs a scan against fake servers: `pages` maps a request start to the page.
    fn run_scan(
        start: &str,
        end: &str,
        limit: usize,
        page_size: u32,
        server: impl Fn(&ScanRequest) -> (Vec<Pair>, Vec<u8>),
    ) -> Result<Vec<String>, Error> {
        let mut cursor = ScanCursor::new(start.as_bytes(), end.as_bytes(), limit);
        let mut out = Vec::new();
        let mut requests = 0;
        while let Some(request) = cursor.request(page_size)? {
            requests += 1;
            assert!(requests < 100, "the scan does not end");
            assert!(request.limit >= 1 && request.limit <= page_size);
            let (page, resume) = server(&request);
            for (k, _) in cursor.advance(page, resume)? {
                out.push(String::from_utf8(k).unwrap());
            }
        }
        Ok(out)
    }

    /// A fake cluster: keys a..z in two groups split at "n"; a page stops at the
    /// group's range end or the limit.
    fn two_groups(request: &ScanRequest) -> (Vec<Pair>, Vec<u8>) {
        let keys: Vec<String> = ('a'..='z').map(|c| c.to_string()).collect();
        let range_end: &[u8] = if request.start.as_slice() < b"n".as_slice() {
            b"n"
        } else {
            b""
        };
        let stop = match (request.end.is_empty(), range_end.is_empty()) {
            (true, _) => range_end.to_vec(),
            (false, true) => request.end.clone(),
            (false, false) => request.end.clone().min(range_end.to_vec()),
        };
        let mut page = Vec::new();
        for k in keys.iter().map(|k| k.as_bytes()) {
            if k < request.start.as_slice() || (!stop.is_empty() && k >= stop.as_slice()) {
                continue;
            }
            if page.len() == request.limit as usize {
                return (page, k.to_vec());
            }
            page.push((k.to_vec(), b"v".to_vec()));
        }
        let resume = if stop == range_end && !range_end.is_empty() {
            range_end.to_vec()
        } else {
            Vec::new()
        };
        (page, resume)
    }

    #[test]
    fn scan_stitches_pages_across_groups_in_order() {
        let all: Vec<String> = ('a'..='z').map(|c| c.to_string()).collect();
        assert_eq!(run_scan("", "", 0, 4, two_groups).unwrap(), all);
        assert_eq!(run_scan("", "", 0, 1000, two_groups).unwrap(), all);
        assert_eq!(
            run_scan("k", "q", 0, 2, two_groups).unwrap(),
            ["k", "l", "m", "n", "o", "p"]
        );
        assert_eq!(
            run_scan("b", "", 5, 3, two_groups).unwrap(),
            ["b", "c", "d", "e", "f"]
        );
        assert_eq!(run_scan("m", "", 2, 10, two_groups).unwrap(), ["m", "n"]);
    }

    #[test]
    fn scan_starts_at_the_beginning_and_skips_empty_pages() {
        let out = run_scan("", "", 0, 10, |r| match r.start.as_slice() {
            b"" => (Vec::new(), b"g".to_vec()),
            b"g" => (pairs(&["h"]), b"t".to_vec()),
            b"t" => (Vec::new(), Vec::new()),
            other => panic!("unexpected start {other:?}"),
        })
        .unwrap();
        assert_eq!(out, ["h"]);
    }

    #[test]
    fn scan_refuses_bad_bounds_and_broken_pages() {
        assert!(matches!(
            run_scan("b", "a", 0, 10, two_groups),
            Err(Error::InvalidArgument { ref field, .. }) if field == "end"
        ));
        assert!(matches!(
            run_scan("a", "", 0, 10, |_| (pairs(&["c", "b"]), Vec::new())),
            Err(Error::Internal(_))
        ));
        assert!(matches!(
            run_scan("a", "", 0, 10, |r| (Vec::new(), r.start.clone())),
            Err(Error::Internal(_))
        ));
        assert!(matches!(
            run_scan("a", "f", 0, 10, |_| (pairs(&["g"]), Vec::new())),
            Err(Error::Internal(_))
        ));
    }
}
