//! Network faults made by the kernel (Jepsen style): every server runs in its own
//! network namespace, and partitions, one-way cuts and loss are nftables rules in
//! the namespaces, delay a `tc netem` qdisc, so the product's own sockets, TCP
//! connections, keepalives and reconnects are what fails, not the in-process fault
//! table of `--enable-fault-injection` (tests/common/faults.rs).
//!
//! Layout of one [`Net`] (all inside namespaces the fixture creates; the machine's
//! own namespace is not touched, so every test can use the same private subnet):
//!
//! ```text
//!   hub namespace "skv-<pid>-<n>-hub": bridge br0 10.0.0.1/24  <- the test's client
//!     ├─ veth v2 ── eth0 10.0.0.2 in "skv-<pid>-<n>-master-1"
//!     ├─ veth v3 ── eth0 10.0.0.3 in "skv-<pid>-<n>-kv-1-1"
//!     └─ ...
//! ```
//!
//! [`run`] runs a test's body on a thread that has entered the hub namespace, so the
//! test's clients reach every server at its namespace address; servers reach each
//! other through the bridge. Servers are started with `ip netns exec`, which execs
//! the server itself: its pid is the server's (kill -9 and SIGSTOP reach it).
//!
//! Faults are per server, keyed by its address: [`Net::partition`] (each side drops
//! what arrives from the other sides, as Jepsen's iptables partitions do),
//! [`Net::cut`] (one way: packets from one server to another are dropped), and
//! [`Net::set_loss`] (drops a random share of what a server sends to other
//! servers; client traffic is spared). Being IP-level, a one-way cut also stops the
//! TCP acknowledgements of the reverse direction: data already in flight on an open
//! connection arrives, new connections fail. [`Net::set_delay`] needs the kernel's
//! netem qdisc, which not every kernel has ([`Net::netem`] says).
//!
//! Namespaces are named `skv-<pid>-<counter>-...`, so parallel tests and other
//! runs do not collide (interfaces, `br0`, `v<n>` and `eth0`, are created
//! directly inside them, so their short names cannot collide either), and are deleted when the [`Net`] is dropped (also when the
//! test panics). Namespaces left by a test process that died are deleted by the
//! next [`Net::new`].
//!
//! Where the machine cannot do this (not root, no `ip` or `nft`, namespaces
//! refused), [`run`] prints why and skips the test; under `CI=true` it fails instead.

use super::{free_ports, Proc};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Prefix of every namespace the fixture creates.
const PREFIX: &str = "skv-";
/// The port every server listens on (each has its own address).
const PORT: u16 = 7000;
/// The private subnet, /24, inside the fixture's namespaces only.
const SUBNET: &str = "10.0.0";
/// The hub's (the test client's) address on the bridge.
const HUB_IP: &str = "10.0.0.1";
/// The nftables table the fixture's rules live in, in each server's namespace.
const TABLE: &str = "shardkv_faults";

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// One server's namespace.
#[derive(Debug)]
struct Host {
    ns: String,
    ip: String,
}

/// The namespaces of one test (see the module docs).
#[derive(Debug)]
pub struct Net {
    /// `skv-<pid>-<n>`: prefix of this test's namespaces.
    id: String,
    hub: String,
    /// Servers by name (addresses are given in creation order).
    hosts: Mutex<BTreeMap<String, Host>>,
    /// Namespaces created so far (deleted on drop, the hub last).
    created: Mutex<Vec<String>>,
    netem: Mutex<Option<bool>>,
}

/// Runs `body` with a new [`Net`] on a thread inside its hub namespace, on a
/// current-thread Tokio runtime (every socket the test opens is then in the hub).
/// Skips (prints why) where namespaces are unavailable, unless `CI=true`.
pub fn run<F, Fut>(test: &str, body: F)
where
    F: FnOnce(Arc<Net>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let net = match Net::new() {
        Ok(net) => Arc::new(net),
        Err(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: needs network namespaces (CI=true, so not skipped): {why}");
            }
            // Straight to the stderr file: the test harness captures print macros,
            // and a skip must show in a passing run.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: needs network namespaces: {why}"
            );
            return;
        }
    };
    let hub = net.ns_path(&net.hub);
    let inner = net.clone();
    let result = std::thread::Builder::new()
        .name(test.to_owned())
        .spawn(move || {
            enter_netns(&hub);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(body(inner));
        })
        .expect("spawn test thread")
        .join();
    // The body's cluster is gone (its processes killed) before the namespaces go.
    drop(net);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &PathBuf) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace file descriptor affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path:?}: {}", std::io::Error::last_os_error());
}

/// Runs a command; Err(stderr) if it cannot start or fails.
fn sh(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    finish(spawn_cmd(program, args, stdin)?)
}

/// Starts a command with `stdin` written to it.
fn spawn_cmd(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Running, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("{program}: write stdin: {e}"))?;
    }
    Ok(Running {
        what: format!("{program} {}", args.join(" ")),
        child,
    })
}

/// A started command.
struct Running {
    what: String,
    child: std::process::Child,
}

/// Waits for a command; Err(stderr) if it failed.
fn finish(running: Running) -> Result<String, String> {
    let out = running
        .child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", running.what))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            running.what,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`sh`], panicking on failure.
fn must(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    sh(program, args, stdin).unwrap_or_else(|e| panic!("{e}"))
}

/// Deletes namespaces of this fixture whose test process no longer exists.
fn delete_stale_namespaces() {
    let Ok(list) = sh("ip", &["netns", "list"], None) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh("ip", &["netns", "delete", name], None);
        }
    }
}

impl Net {
    /// Checks the machine and creates the hub namespace with its bridge; Err says
    /// why it cannot.
    pub fn new() -> Result<Net, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        sh("ip", &["-V"], None).map_err(|e| format!("no `ip` (iproute2): {e}"))?;
        sh("nft", &["--version"], None).map_err(|e| format!("no `nft` (nftables): {e}"))?;
        delete_stale_namespaces();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT_NET.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            hub: format!("{id}-hub"),
            id,
            hosts: Mutex::new(BTreeMap::new()),
            created: Mutex::new(Vec::new()),
            netem: Mutex::new(None),
        };
        net.add_ns(&net.hub)
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        let hub = net.hub.as_str();
        for args in [
            vec!["-n", hub, "link", "set", "lo", "up"],
            vec!["-n", hub, "link", "add", "br0", "type", "bridge"],
            vec![
                "-n",
                hub,
                "addr",
                "add",
                &format!("{HUB_IP}/24"),
                "dev",
                "br0",
            ],
            vec!["-n", hub, "link", "set", "br0", "up"],
        ] {
            sh("ip", &args, None).map_err(|e| format!("cannot set up the bridge: {e}"))?;
        }
        Ok(net)
    }

    fn ns_path(&self, ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }

    fn add_ns(&self, ns: &str) -> Result<(), String> {
        sh("ip", &["netns", "add", ns], None)?;
        self.created.lock().unwrap().push(ns.to_owned());
        Ok(())
    }

    /// The address of server `name` (`10.0.0.x:7000`), creating its namespace,
    /// its veth into the hub's bridge and its (empty) nftables chains the first time.
    pub fn host(&self, name: &str) -> String {
        let mut hosts = self.hosts.lock().unwrap();
        if let Some(h) = hosts.get(name) {
            return format!("{}:{PORT}", h.ip);
        }
        let n = hosts.len() + 2;
        assert!(n < 255, "too many servers for one /24");
        let ns = format!("{}-{name}", self.id);
        let ip = format!("{SUBNET}.{n}");
        let veth = format!("v{n}");
        self.add_ns(&ns).unwrap_or_else(|e| panic!("{e}"));
        let hub = self.hub.as_str();
        for args in [
            vec![
                "-n", hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
            vec!["-n", hub, "link", "set", &veth, "master", "br0"],
            vec!["-n", hub, "link", "set", &veth, "up"],
            vec!["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            vec!["-n", &ns, "link", "set", "eth0", "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ] {
            must("ip", &args, None);
        }
        let table = format!(
            "table inet {TABLE} {{\n\
             chain input {{ type filter hook input priority 0; policy accept; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; }}\n\
             }}\n"
        );
        must(
            "ip",
            &["netns", "exec", &ns, "nft", "-f", "-"],
            Some(&table),
        );
        hosts.insert(name.to_owned(), Host { ns, ip: ip.clone() });
        format!("{ip}:{PORT}")
    }

    /// A process that runs `program args` as server `name` inside its namespace.
    pub fn proc(
        &self,
        name: &str,
        program: &str,
        args: Vec<String>,
        log: impl Into<PathBuf>,
    ) -> Proc {
        self.host(name);
        let ns = self.ns_of_name(name);
        let mut wrapped = vec!["netns".to_string(), "exec".into(), ns, program.into()];
        wrapped.extend(args);
        Proc::new(name, "ip", wrapped, log)
    }

    fn ns_of_name(&self, name: &str) -> String {
        self.hosts.lock().unwrap()[name].ns.clone()
    }

    /// The namespace and IP of the server at `addr` (`ip:port` or `ip`).
    fn find(&self, addr: &str) -> (String, String) {
        let ip = addr.split(':').next().expect("address");
        let hosts = self.hosts.lock().unwrap();
        let h = hosts
            .values()
            .find(|h| h.ip == ip)
            .unwrap_or_else(|| panic!("{addr} is no server of this Net"));
        (h.ns.clone(), h.ip.clone())
    }

    fn nft(&self, ns: &str, script: &str) {
        self.nft_all(&[(ns.to_owned(), script.to_owned())]);
    }

    /// Runs nftables `scripts` (namespace, script) at once, so a fault on many
    /// servers starts nearly together rather than one `nft` start-up apart.
    fn nft_all(&self, scripts: &[(String, String)]) {
        let running: Vec<Running> = scripts
            .iter()
            .map(|(ns, script)| {
                spawn_cmd("ip", &["netns", "exec", ns, "nft", "-f", "-"], Some(script))
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        for r in running {
            finish(r).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Cuts every link between servers (addresses) on different `sides`, both ways:
    /// each server drops what arrives from the other sides. Others are unaffected.
    pub fn partition(&self, sides: &[Vec<String>]) {
        let mut scripts = Vec::new();
        for (s, side) in sides.iter().enumerate() {
            let others: Vec<String> = sides
                .iter()
                .enumerate()
                .filter(|(o, _)| *o != s)
                .flat_map(|(_, other)| other.iter().map(|a| self.find(a).1))
                .collect();
            if others.is_empty() {
                continue;
            }
            let rule = format!(
                "add rule inet {TABLE} input ip saddr {{ {} }} counter drop\n",
                others.join(", ")
            );
            scripts.extend(side.iter().map(|addr| (self.find(addr).0, rule.clone())));
        }
        self.nft_all(&scripts);
        println!("kernel partition {sides:?}");
    }

    /// Drops every packet `from` sends to `to` (one way, at `to`).
    pub fn cut(&self, from: &str, to: &str) {
        let (_, from_ip) = self.find(from);
        let (to_ns, _) = self.find(to);
        self.nft(
            &to_ns,
            &format!("add rule inet {TABLE} input ip saddr {from_ip} counter drop\n"),
        );
        println!("kernel one-way cut {from} -> {to}");
    }

    /// `addr` drops `percent` % (at random) of the packets it sends to other servers
    /// (not to the test's clients).
    pub fn set_loss(&self, addr: &str, percent: u32) {
        let (ns, _) = self.find(addr);
        self.nft(
            &ns,
            &format!(
                "add rule inet {TABLE} output ip daddr != {HUB_IP} numgen random mod 100 < {percent} counter drop\n"
            ),
        );
    }

    /// True if the kernel has the netem qdisc (probed once, on the first server).
    pub fn netem(&self) -> bool {
        let mut known = self.netem.lock().unwrap();
        if let Some(k) = *known {
            return k;
        }
        let ns = {
            let hosts = self.hosts.lock().unwrap();
            hosts.values().next().expect("a server").ns.clone()
        };
        let probe = sh(
            "ip",
            &[
                "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                "delay", "0ms",
            ],
            None,
        );
        let ok = probe.is_ok();
        if ok {
            must(
                "ip",
                &[
                    "netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                ],
                None,
            );
        } else {
            println!("no netem in this kernel: {}", probe.unwrap_err());
        }
        *known = Some(ok);
        ok
    }

    /// Delays everything `addr` sends by `ms` (netem). Err if the kernel has no netem.
    pub fn set_delay(&self, addr: &str, ms: u32) -> Result<(), String> {
        if !self.netem() {
            return Err("the kernel has no netem qdisc (sch_netem)".into());
        }
        let (ns, _) = self.find(addr);
        let delay = format!("{ms}ms");
        sh(
            "ip",
            &[
                "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                "delay", &delay,
            ],
            None,
        )
        .map(|_| ())
    }

    /// Removes every fault of every server.
    pub fn heal_all(&self) {
        let namespaces = self.namespaces();
        let flush = format!("flush chain inet {TABLE} input\nflush chain inet {TABLE} output\n");
        let scripts: Vec<(String, String)> = namespaces
            .iter()
            .map(|ns| (ns.clone(), flush.clone()))
            .collect();
        self.nft_all(&scripts);
        if *self.netem.lock().unwrap() == Some(true) {
            for ns in &namespaces {
                // No qdisc to delete is fine.
                let _ = sh(
                    "ip",
                    &[
                        "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                    ],
                    None,
                );
            }
        }
        println!("kernel faults healed");
    }

    /// Packets dropped by the fixture's rules in namespace `ns` since its last heal.
    fn dropped_in(&self, ns: &str) -> u64 {
        let listing = must(
            "ip",
            &["netns", "exec", ns, "nft", "list", "table", "inet", TABLE],
            None,
        );
        listing
            .split("counter packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// The servers' namespaces.
    fn namespaces(&self) -> Vec<String> {
        let hosts = self.hosts.lock().unwrap();
        hosts.values().map(|h| h.ns.clone()).collect()
    }

    /// Checks that the fault (`what`) bites: the rules of the servers dropped packets
    /// since their last heal.
    pub fn expect_dropped(&self, what: &str) {
        let dropped = self.dropped();
        assert!(dropped > 0, "the {what} dropped no packet");
        println!("the {what} dropped {dropped} packets");
    }

    /// Packets dropped by the fixture's rules of every server since their last heal.
    pub fn dropped(&self) -> u64 {
        self.namespaces().iter().map(|ns| self.dropped_in(ns)).sum()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        // Server namespaces first (deleting one also deletes its veth), the hub last.
        for ns in created.iter().rev() {
            if let Err(e) = sh("ip", &["netns", "delete", ns], None) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// The addresses of servers `names`: in `net` if given, else free loopback ports.
pub fn addrs(net: Option<&Net>, names: &[String]) -> Vec<String> {
    match net {
        Some(net) => names.iter().map(|n| net.host(n)).collect(),
        None => free_ports(names.len())
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect(),
    }
}

/// Starts server `name`: in its namespace of `net` if given, else directly.
pub fn spawn(
    net: Option<&Net>,
    name: String,
    program: &str,
    args: Vec<String>,
    log: PathBuf,
) -> Proc {
    match net {
        Some(net) => {
            let mut p = net.proc(&name, program, args, log);
            p.start();
            p
        }
        None => Proc::spawn(name, program, args, log),
    }
}
