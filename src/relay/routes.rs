//! Where the source relay sends a connection it accepted: to which target relay, to be
//! delivered where, as part of which migration, or, when the relay cannot help, straight to
//! where the connection was going.
//!
//! - [`Routes::Fixed`]: the `relay source` command, one target relay and one delivery address
//!   for every connection.
//! - [`Routes::Intercepted`]: connections redirected out of virt-handler's network namespace
//!   (see [`super::intercept`]), each routed by its original destination, the target
//!   virt-handler's migration port, which the agent registers for each outgoing migration. A
//!   connection with no registered route goes direct.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use super::intercept::NetNs;
use super::net::Endpoint;

/// One connection's way through the relays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The migration it belongs to: its connections share one session (one filter, one order).
    pub migration: String,
    /// The target relay (HOST:PORT).
    pub target_relay: String,
    /// More addresses of the same target relay, one per extra network path between the two
    /// nodes. The migration's connections are spread over all of them (see
    /// [`Route::relay_for`]); the target relay puts them back together by their session.
    pub extra_paths: Vec<String>,
    /// Where the target relay delivers it.
    pub deliver_to: Endpoint,
}

impl Route {
    /// The target relay address the migration's `index`-th connection goes to. The first
    /// connection (QEMU's main channel, which also carries the target's filter back) takes the
    /// first path; the others go round the paths in turn, so with QEMU's multifd channels each
    /// path carries its share of the memory.
    pub fn relay_for(&self, index: u32) -> &str {
        let paths = 1 + self.extra_paths.len();
        match index as usize % paths {
            0 => &self.target_relay,
            i => &self.extra_paths[i - 1],
        }
    }
}

/// What to do with an accepted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Relay(Route),
    /// Deliver it straight to where it was going, from the namespace it came from.
    Direct {
        to: SocketAddr,
        why: &'static str,
    },
    /// Nothing sensible can be done (the kernel did not say where it was going): close it, so
    /// the migration fails and the guest keeps running on the source.
    Close {
        why: String,
    },
}

pub enum Routes {
    Fixed(Route),
    Intercepted(InterceptRoutes),
}

impl Routes {
    /// Whether accepted connections were redirected (their original destination is needed).
    pub fn intercepted(&self) -> Option<&InterceptRoutes> {
        match self {
            Routes::Intercepted(r) => Some(r),
            Routes::Fixed(_) => None,
        }
    }

    /// The decision for a connection that was going to `original` (intercepted routes only).
    pub fn decide(&self, original: Option<std::io::Result<SocketAddr>>) -> Decision {
        match self {
            Routes::Fixed(route) => Decision::Relay(route.clone()),
            Routes::Intercepted(r) => match original {
                Some(Ok(to)) => match r.get(&to) {
                    Some(route) => Decision::Relay(route),
                    None => Decision::Direct {
                        to,
                        why: "no migration is registered for this destination",
                    },
                },
                Some(Err(e)) => Decision::Close {
                    why: format!("cannot read the connection's original destination: {e}"),
                },
                None => Decision::Close {
                    why: "the connection's original destination is unknown".into(),
                },
            },
        }
    }
}

/// The routes of the migrations leaving through one network namespace, by destination.
pub struct InterceptRoutes {
    pub netns: NetNs,
    routes: Mutex<BTreeMap<SocketAddr, Route>>,
}

impl InterceptRoutes {
    pub fn new(netns: NetNs) -> Self {
        Self {
            netns,
            routes: Mutex::default(),
        }
    }

    /// Routes connections to `to` through `target_relay` (and its `extra_paths`), as part of
    /// `migration`; they are delivered to `to` itself.
    pub fn register(
        &self,
        to: SocketAddr,
        migration: &str,
        target_relay: &str,
        extra_paths: &[String],
    ) {
        self.routes.lock().expect("routes lock").insert(
            to,
            Route {
                migration: migration.to_string(),
                target_relay: target_relay.to_string(),
                extra_paths: extra_paths.to_vec(),
                deliver_to: Endpoint::Tcp(to.to_string()),
            },
        );
    }

    pub fn unregister(&self, to: &SocketAddr) {
        self.routes.lock().expect("routes lock").remove(to);
    }

    pub fn get(&self, to: &SocketAddr) -> Option<Route> {
        self.routes.lock().expect("routes lock").get(to).cloned()
    }

    /// The destinations registered now.
    pub fn destinations(&self) -> Vec<SocketAddr> {
        self.routes
            .lock()
            .expect("routes lock")
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_routes_send_everything_to_one_target() {
        let route = Route {
            migration: String::new(),
            target_relay: "10.0.0.2:7443".into(),
            extra_paths: Vec::new(),
            deliver_to: Endpoint::Tcp("10.0.0.2:4444".into()),
        };
        let routes = Routes::Fixed(route.clone());
        assert!(routes.intercepted().is_none());
        assert_eq!(routes.decide(None), Decision::Relay(route));
    }

    #[test]
    fn connections_go_round_the_paths_the_first_on_the_first() {
        let route = Route {
            migration: "m".into(),
            target_relay: "10.0.0.2:7443".into(),
            extra_paths: vec!["10.1.0.2:7443".into(), "10.2.0.2:7443".into()],
            deliver_to: Endpoint::Tcp("10.0.0.2:4444".into()),
        };
        let used: Vec<&str> = (0..7).map(|i| route.relay_for(i)).collect();
        assert_eq!(
            used,
            [
                "10.0.0.2:7443",
                "10.1.0.2:7443",
                "10.2.0.2:7443",
                "10.0.0.2:7443",
                "10.1.0.2:7443",
                "10.2.0.2:7443",
                "10.0.0.2:7443"
            ]
        );
        let single = Route {
            extra_paths: Vec::new(),
            ..route
        };
        assert!((0..5).all(|i| single.relay_for(i) == "10.0.0.2:7443"));
    }

    #[test]
    fn intercepted_connections_follow_their_destination_or_go_direct() {
        let r = InterceptRoutes::new(NetNs("/run/netns/x".into()));
        let to: SocketAddr = "10.244.1.7:43061".parse().unwrap();
        let other: SocketAddr = "10.244.1.7:43062".parse().unwrap();
        r.register(to, "ns/vm-1/uid-1", "10.0.0.2:7443", &[]);
        let routes = Routes::Intercepted(r);
        assert_eq!(
            routes.decide(Some(Ok(to))),
            Decision::Relay(Route {
                migration: "ns/vm-1/uid-1".into(),
                target_relay: "10.0.0.2:7443".into(),
                extra_paths: Vec::new(),
                deliver_to: Endpoint::Tcp("10.244.1.7:43061".into()),
            })
        );
        assert!(
            matches!(routes.decide(Some(Ok(other))), Decision::Direct { to, .. } if to == other)
        );
        assert!(matches!(
            routes.decide(Some(Err(std::io::Error::other("x")))),
            Decision::Close { .. }
        ));
        assert!(matches!(routes.decide(None), Decision::Close { .. }));
        let r = routes.intercepted().unwrap();
        assert_eq!(r.destinations(), vec![to]);
        r.unregister(&to);
        assert!(matches!(
            routes.decide(Some(Ok(to))),
            Decision::Direct { .. }
        ));
    }
}
