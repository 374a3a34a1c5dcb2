//! The private Redis server the fleet tests use (`common::redis::RedisServer`): it is the one
//! the test started, it refuses clients without the ACL user's password, and it can be
//! stopped and started again on the same port (a Redis restart during calls).

mod common;

use common::redis::{RedisServer, Reply, RespConn, USER};

#[test]
fn private_redis_requires_its_acl_user_and_restarts() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    // Without credentials, or with the wrong ones, nothing is served.
    let mut anon = RespConn::connect(&redis.addr()).unwrap();
    assert!(
        matches!(anon.call(&["PING"]).unwrap(), Reply::Error(e) if e.starts_with("NOAUTH")),
        "the default user is off"
    );
    assert!(matches!(
        anon.call(&["AUTH", USER, "wrong-password"]).unwrap(),
        Reply::Error(e) if e.starts_with("WRONGPASS")
    ));
    assert!(matches!(
        anon.call(&["AUTH", "default", ""]).unwrap(),
        Reply::Error(_)
    ));
    assert_eq!(
        redis
            .command(&["SET", "presence:alice", "gw1", "EX", "30"])
            .unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        redis.command(&["GET", "presence:alice"]).unwrap(),
        Reply::Bulk(Some(b"gw1".to_vec()))
    );
    // The password is in a private config file, not in the process's arguments.
    let pid = redis.pid().expect("running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("redis"), "{cmdline}");
    assert!(!cmdline.contains(&redis.password), "{cmdline}");

    redis.stop();
    assert!(RespConn::connect(&redis.addr()).is_err(), "stopped");
    redis.restart();
    // Back on the same port, empty (no persistence), same credentials.
    assert_eq!(
        redis.command(&["GET", "presence:alice"]).unwrap(),
        Reply::Bulk(None)
    );
}
