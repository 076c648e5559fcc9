//! The broker contract (`keel_testkit::broker_contract`) against the embedded
//! `MemoryBroker`. A Redis broker runs the same functions against a real
//! `redis-server`.

use std::sync::Arc;

use keel::broker::{Broker, BrokerLimits};
use keel::MemoryBroker;
use keel_testkit::broker_contract as contract;

fn make() -> Arc<dyn Broker> {
    Arc::new(MemoryBroker::new(4))
}

fn make_limited(limits: BrokerLimits) -> Arc<dyn Broker> {
    Arc::new(MemoryBroker::new(4).with_limits(limits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_contiguous_offsets() {
    contract::concurrent_publishers_get_contiguous_offsets(&make).await;
}

#[tokio::test]
async fn history_is_complete_or_nothing() {
    contract::history_is_complete_or_nothing(&make).await;
}

#[tokio::test]
async fn data_is_kept_byte_for_byte() {
    contract::data_is_kept_byte_for_byte(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_while_publishing_leaves_no_gap() {
    contract::since_while_publishing_leaves_no_gap(&make).await;
}

#[tokio::test]
async fn epoch_changes_when_the_stream_is_lost() {
    contract::epoch_changes_when_the_stream_is_lost(&make).await;
}

#[tokio::test]
async fn interest_is_counted_per_node() {
    contract::interest_is_counted_per_node(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sees_one_order() {
    contract::every_node_sees_one_order(&make).await;
}

#[tokio::test(start_paused = true)]
async fn history_expires_after_its_ttl() {
    contract::history_expires_after_its_ttl(&make).await;
}

#[tokio::test]
async fn presence_joins_refreshes_and_leaves() {
    contract::presence_joins_refreshes_and_leaves(&make).await;
}

#[tokio::test(start_paused = true)]
async fn presence_expires_after_its_ttl() {
    contract::presence_expires_after_its_ttl(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_is_taken_once() {
    contract::a_ticket_is_taken_once(&make).await;
}

#[tokio::test(start_paused = true)]
async fn a_ticket_expires() {
    contract::a_ticket_expires(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_resumed_once() {
    contract::a_session_is_resumed_once(&make).await;
}

#[tokio::test(start_paused = true)]
async fn a_session_expires() {
    contract::a_session_expires(&make).await;
}

#[tokio::test]
async fn history_stays_within_its_bound() {
    contract::history_stays_within_its_bound(&make_limited).await;
}

#[tokio::test]
async fn channels_stay_within_their_bound() {
    contract::channels_stay_within_their_bound(&make_limited).await;
}

#[tokio::test]
async fn history_stays_within_its_bytes_per_channel() {
    contract::history_stays_within_its_bytes_per_channel(&make).await;
}

#[tokio::test]
async fn sessions_stay_within_their_bound() {
    contract::sessions_stay_within_their_bound(&make_limited).await;
}

#[tokio::test]
async fn presence_stays_within_its_bound() {
    contract::presence_stays_within_its_bound(&make_limited).await;
}
