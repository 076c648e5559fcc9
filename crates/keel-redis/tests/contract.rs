//! The broker contract (`keel_testkit::broker_contract`) against `RedisBroker`
//! and a real `redis-server` started for each test. Each broker gets a key prefix
//! of its own, so brokers made by one factory start with no channels.
//!
//! Not run here yet, with the reason: the TTL functions (they move tokio's
//! paused clock, Redis keeps its own), `epoch_changes_when_the_stream_is_lost`
//! (in Redis a stream's meta outlives the loss of interest, so its epoch and
//! offsets go on), and the bounds on history bytes, channels, sessions and
//! presence (not in the Redis broker yet).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel::broker::Broker;
use keel_redis::RedisBroker;
use keel_testkit::broker_contract as contract;
use keel_testkit::redis::RedisServer;

/// A factory of brokers on `server`, each under a prefix of its own.
fn factory(server: &RedisServer) -> impl Fn() -> Arc<dyn Broker> + Sync + '_ {
    static N: AtomicU64 = AtomicU64::new(0);
    move || {
        let prefix = format!(
            "t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let url = server.url();
        let broker = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(RedisBroker::connect(&url, &prefix))
        })
        .unwrap();
        Arc::new(broker)
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let server = RedisServer::start();
            contract::$name(&factory(&server)).await;
        }
    )*};
}

contract!(
    concurrent_publishers_get_contiguous_offsets,
    history_is_complete_or_nothing,
    data_is_kept_byte_for_byte,
    since_while_publishing_leaves_no_gap,
    interest_is_counted_per_node,
    every_node_sees_one_order,
    presence_joins_refreshes_and_leaves,
    a_ticket_is_taken_once,
    a_session_is_resumed_once,
);
