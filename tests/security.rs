//! A cluster run over mutual TLS (`shardctl playground --tls`): data and admin
//! commands work with the playground's certificates; a plaintext client, a client
//! that trusts another CA, a client without a certificate and a server peer whose
//! certificate another CA signed are refused; an admin call without the admin
//! credential, or with a wrong token, is refused and leaves the configuration as it
//! was. One playground serves every check, so the file runs in well under a minute.

mod common;

use common::user::{bin, http, poll_until, run_within, Playground, PortBlock, Ran};
use shardkv::client::master::MasterClient;
use shardkv::proto::internal::raft_client::RaftClient;
use shardkv::proto::internal::RaftBatch;
use shardkv::proto::shard_master_client::ShardMasterClient;
use shardkv::proto::{QueryRequest, SplitRequest};
use shardkv::security::pki::{Pki, PkiFiles};
use shardkv::security::Dialer;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const UP_WAIT: Duration = Duration::from_secs(120);
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// `shardctl --masters MASTERS SECURITY... ARGS`, with no security settings taken
/// from the environment.
fn shardctl(masters: &str, security: &[&Path], flags: &[&str], args: &[&str]) -> Ran {
    let mut c = Command::new(bin("shardctl"));
    for v in [
        "SHARDKV_MASTERS",
        "SHARDKV_TLS_CA",
        "SHARDKV_TLS_CERT",
        "SHARDKV_TLS_KEY",
        "SHARDKV_TOKEN_FILE",
    ] {
        c.env_remove(v);
    }
    c.args(["--masters", masters]);
    for (flag, path) in flags.iter().zip(security) {
        c.arg(flag).arg(path);
    }
    c.args(args);
    run_within(&mut c, RUN_LIMIT)
}

/// The flags that make shardctl an admin of the playground.
fn admin(files: &PkiFiles) -> ([&Path; 3], [&'static str; 3]) {
    (
        [&files.ca, &files.admin.0, &files.admin.1],
        ["--tls-ca", "--tls-cert", "--tls-key"],
    )
}

fn dialer(ca: &Path, identity: &(std::path::PathBuf, std::path::PathBuf)) -> Dialer {
    let read = |p: &Path| std::fs::read(p).expect("read a PEM file");
    Dialer::default()
        .with_ca_pem(&read(ca))
        .with_identity_pem(&read(&identity.0), &read(&identity.1))
}

/// The latest configuration number: the highest any replica knows (a follower may
/// lag; none is ahead of the leader, which answers after a read barrier).
async fn config_num(dialer: &Dialer, masters: &str) -> u64 {
    let mut highest = 0;
    for master in masters.split(',') {
        let mut client =
            ShardMasterClient::new(dialer.connect_lazy(dialer.endpoint(master).unwrap()));
        if let Ok(reply) = client.query(QueryRequest { num: None }).await {
            highest = highest.max(reply.into_inner().num);
        }
    }
    assert!(highest > 0, "no shard master replica answered");
    highest
}

/// A Raft `Send` stream with no batches: harmless, and internal (servers only).
async fn raft_send(dialer: &Dialer, addr: &str) -> Result<(), tonic::Status> {
    let endpoint = dialer
        .endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let mut raft = RaftClient::new(dialer.connect_lazy(endpoint));
    raft.send(tokio_stream::empty::<RaftBatch>()).await?;
    Ok(())
}

#[test]
fn a_tls_playground_serves_its_certificates_and_refuses_everyone_else() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ports = PortBlock::pick();
    let dir = tmp.path().join("playground");
    let mut pg = Playground::start_with(tmp.path(), &dir, ports, &["--tls"]);
    pg.wait_up(UP_WAIT);
    let masters = ports.masters();
    let files = PkiFiles::at(&dir.join("tls"));
    assert!(
        pg.wait_stdout_contains("grpcurl -cacert", Duration::from_secs(10)),
        "no grpcurl hint: {}",
        pg.stdout()
    );

    // (a) Data through the router (which holds the data certificate) and shardctl,
    // and an admin command with the admin certificate.
    let router = ports.router_addr();
    let mut last = String::new();
    let stored = poll_until(Duration::from_secs(30), || {
        match http("PUT", &router, "/keys/apple", b"red", RUN_LIMIT) {
            Ok(r) if r.status == 200 => true,
            Ok(r) => {
                last = format!("{} {}", r.status, r.text());
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(stored, "PUT through the router: {last}");
    let (paths, flags) = admin(&files);
    let got = shardctl(&masters, &paths, &flags, &["get", "apple"]);
    assert_eq!(got.code, Some(0), "{}", got.describe());
    assert_eq!(got.stdout.trim(), "red");
    let put = shardctl(&masters, &paths, &flags, &["put", "pear", "green"]);
    assert_eq!(put.code, Some(0), "{}", put.describe());
    let got = http("GET", &router, "/keys/pear", b"", RUN_LIMIT).expect("GET");
    assert_eq!((got.status, got.body.as_slice()), (200, &b"green"[..]));

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let as_admin = dialer(&files.ca, &files.admin);
    let before_split = runtime.block_on(config_num(&as_admin, &masters));
    let split = shardctl(&masters, &paths, &flags, &["split", "b"]);
    assert_eq!(split.code, Some(0), "{}", split.describe());
    let num = runtime.block_on(config_num(&as_admin, &masters));
    assert_eq!(
        num,
        before_split + 1,
        "the admin's split made a configuration"
    );

    // (b) A plaintext client, one without a certificate and one that trusts another
    // CA are refused at the connection.
    let other = tmp.path().join("other-ca");
    let other_files = Pki::generate("another CA").unwrap().write(&other).unwrap();
    let quick = ["--timeout", "3", "get", "apple"];
    let plaintext = shardctl(&masters, &[], &[], &quick);
    let no_cert = shardctl(&masters, &[&files.ca], &["--tls-ca"], &quick);
    let wrong_ca = shardctl(
        &masters,
        &[&other_files.ca, &files.admin.0, &files.admin.1],
        &flags,
        &quick,
    );
    for (what, ran, says) in [
        ("plaintext", &plaintext, "--tls-ca"),
        ("no client certificate", &no_cert, "--tls-cert"),
        ("another CA", &wrong_ca, "invalid peer certificate"),
    ] {
        assert_eq!(ran.code, Some(2), "{what}: {}", ran.describe());
        assert!(!ran.stdout.contains("red"), "{what}: {}", ran.describe());
        assert!(ran.stderr.contains(says), "{what}: {}", ran.describe());
    }

    runtime.block_on(async {
        // A server peer with a certificate from another CA is refused at the
        // handshake, before any RPC; the cluster's own server certificate passes;
        // an admin certificate is no server's and gets PermissionDenied.
        let kv = ports.kv_port();
        let node = format!("127.0.0.1:{kv}");
        let rogue = Dialer::default()
            .with_ca_pem(&std::fs::read(&files.ca).unwrap())
            .with_identity_pem(
                &std::fs::read(&other_files.server.0).unwrap(),
                &std::fs::read(&other_files.server.1).unwrap(),
            );
        let refused = raft_send(&rogue, &node).await.expect_err("rogue peer");
        assert!(
            !matches!(
                refused.code(),
                Code::PermissionDenied | Code::Unauthenticated
            ),
            "refused by the handshake, not by a handler: {refused:?}"
        );
        raft_send(&dialer(&files.ca, &files.server), &node)
            .await
            .expect("a server certificate of the cluster is a peer");
        let as_admin_peer = raft_send(&as_admin, &node)
            .await
            .expect_err("admin as peer");
        assert_eq!(
            as_admin_peer.code(),
            Code::PermissionDenied,
            "{as_admin_peer:?}"
        );

        // (c) Admin calls without the admin credential, or with a wrong token, are
        // refused and change nothing.
        let before = config_num(&as_admin, &masters).await;
        let as_data = dialer(&files.ca, &files.data);
        let wrong_token = as_data.clone().with_token("not-the-admin-token").unwrap();
        // At the leader, whichever replica it is (the library follows hints).
        let addrs: Vec<String> = masters.split(',').map(str::to_owned).collect();
        let split = |dialer: Dialer, addrs: Vec<String>| async move {
            let masters = MasterClient::new(&addrs, Duration::from_secs(10), &dialer).unwrap();
            masters
                .call(|mut c| async move {
                    let request = SplitRequest {
                        key: b"c".to_vec(),
                        id: None,
                    };
                    c.split(request).await
                })
                .await
        };
        let denied = split(as_data.clone(), addrs.clone())
            .await
            .expect_err("data role");
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("OU=admin"), "{denied:?}");
        let bad = split(wrong_token, addrs.clone())
            .await
            .expect_err("wrong token");
        assert_eq!(bad.code(), Code::Unauthenticated, "{bad:?}");
        assert_eq!(
            config_num(&as_admin, &masters).await,
            before,
            "nothing changed"
        );
        let token = std::fs::read_to_string(&files.admin_token).unwrap();
        split(as_data.with_token(token.trim()).unwrap(), addrs.clone())
            .await
            .expect("the admin token is an admin credential");
        assert_eq!(config_num(&as_admin, &masters).await, before + 1);
    });

    // The same refusals through shardctl say why.
    let denied = shardctl(
        &masters,
        &[&files.ca, &files.data.0, &files.data.1],
        &flags,
        &["split", "d"],
    );
    assert_eq!(denied.code, Some(2), "{}", denied.describe());
    assert!(
        denied.stderr.contains("needs an admin credential"),
        "{}",
        denied.describe()
    );
}

#[test]
fn a_data_token_alone_would_leave_admin_calls_open_and_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let token = tmp.path().join("data-token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let mut c = Command::new(bin("shardmaster"));
    c.args(["--id", "1", "--peers", "1=127.0.0.1:1", "--data-dir"])
        .arg(tmp.path().join("m1"))
        .arg("--data-token-file")
        .arg(&token);
    let ran = run_within(&mut c, RUN_LIMIT);
    assert_ne!(ran.code, Some(0), "{}", ran.describe());
    assert!(
        ran.stderr.contains("--admin-token-file"),
        "{}",
        ran.describe()
    );
}
