//! Who may do what on which channel: channel namespaces, private user channels
//! and the JWT `channels` claim, decided by [`authorize`] (which
//! [`Hub::authorize`](crate::Hub::authorize) calls with the Hub's configuration).
//!
//! A channel `ns:rest` belongs to namespace `ns` when one is configured
//! (`[[namespaces]] name = "ns"`); other channels follow the top-level rules (any
//! connection may subscribe and publish). A channel `#<client_id>` is private:
//! only that client may subscribe to it or read its presence and history, and no
//! client may publish to it (the server does, with
//! [`Hub::publish`](crate::Hub::publish)). A JWT with a
//! `channels` claim limits its holder to the channels listed there (exact names,
//! or a prefix ending in `*`), wherever they are. Reading presence or history
//! needs the right to subscribe.
//!
//! This module decides; it does not enforce by itself. The gateway asks before it
//! acts on a client's request; server-side calls
//! ([`Hub::subscribe`](crate::Hub::subscribe), [`Hub::publish`](crate::Hub::publish))
//! are the application's own and are not checked. A pure function of the
//! configuration, the connection's identity and its channel list.

use crate::config::{Config, Namespace};
use crate::conn::Connection;
use crate::error::{Error, ErrorKind, Result};

/// What a client asks to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// `subscribe` (and `resume` taking the channel back).
    Subscribe,
    /// `publish`.
    Publish,
    /// `presence`.
    Presence,
    /// `history`.
    History,
}

pub use crate::config::SubscribeRule;

/// The namespace `channel` belongs to, if one is configured.
pub(crate) fn namespace<'a>(namespaces: &'a [Namespace], channel: &str) -> Option<&'a Namespace> {
    let (ns, _) = channel.split_once(':')?;
    namespaces.iter().find(|n| n.name == ns)
}

fn claim_allows(claim: &[String], channel: &str) -> bool {
    claim.iter().any(|c| match c.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => c == channel,
    })
}

fn forbidden(why: String) -> Error {
    Error::new(ErrorKind::Forbidden, why)
}

/// Whether `conn` may do `action` on `channel` under `config`: `Ok`, or
/// [`ErrorKind::Forbidden`] saying why, or [`ErrorKind::LimitExceeded`] for a
/// subscription past `max_subscriptions_per_connection`. See the module
/// documentation for the rules.
pub fn authorize(config: &Config, conn: &Connection, action: Action, channel: &str) -> Result<()> {
    if let Some(owner) = channel.strip_prefix('#') {
        if action == Action::Publish {
            return Err(forbidden(format!(
                "`{channel}` is a private channel: clients do not publish to it"
            )));
        }
        if *conn.client_id() != *owner {
            return Err(forbidden(format!(
                "`{channel}` is another client's private channel"
            )));
        }
        return check_subscription_count(config, conn, action, channel);
    }
    let ns = namespace(&config.namespaces, channel);
    match action {
        Action::Publish => {
            if let Some(n) = ns.filter(|n| !n.publish) {
                return Err(forbidden(format!(
                    "clients may not publish in namespace `{}`",
                    n.name
                )));
            }
            Ok(())
        }
        Action::Subscribe | Action::Presence | Action::History => {
            // Only here: `publish` (the hot request) needs no identity.
            let identity = conn.identity();
            if let Some(claim) = identity.as_ref().and_then(|i| i.channels.as_deref()) {
                if !claim_allows(claim, channel) {
                    return Err(forbidden(format!(
                        "`{channel}` is not in the token's channels"
                    )));
                }
            }
            if let Some(n) = ns {
                match n.subscribe {
                    SubscribeRule::Anyone => {}
                    SubscribeRule::Authenticated if identity.is_some() => {}
                    SubscribeRule::Authenticated => {
                        return Err(forbidden(format!(
                            "namespace `{}` is for authenticated clients",
                            n.name
                        )))
                    }
                    SubscribeRule::Claim => {
                        let listed = identity
                            .as_ref()
                            .and_then(|i| i.channels.as_deref())
                            .is_some_and(|c| claim_allows(c, channel));
                        if !listed {
                            return Err(forbidden(format!(
                                "namespace `{}` needs `{channel}` in the token's channels",
                                n.name
                            )));
                        }
                    }
                }
                if action == Action::Presence && !n.presence {
                    return Err(forbidden(format!(
                        "presence is off in namespace `{}`",
                        n.name
                    )));
                }
            }
            check_subscription_count(config, conn, action, channel)
        }
    }
}

fn check_subscription_count(
    config: &Config,
    conn: &Connection,
    action: Action,
    channel: &str,
) -> Result<()> {
    let Some(max) = config.max_subscriptions_per_connection else {
        return Ok(());
    };
    if action != Action::Subscribe {
        return Ok(());
    }
    let chans = conn.inner.channels.lock();
    if chans.len() >= max && !chans.iter().any(|c| &**c == channel) {
        return Err(Error::new(
            ErrorKind::LimitExceeded,
            format!("at max_subscriptions_per_connection ({max})"),
        ));
    }
    Ok(())
}
