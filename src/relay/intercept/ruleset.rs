//! The nftables ruleset that sends virt-handler's outgoing migration connections to the relay,
//! as text for `nft`, and the parsing of what `nft` lists back. Plain text in, plain text out:
//! tested byte for byte without a network namespace.
//!
//! One table per network namespace, `inet commonground_relay`, created with the `owner` flag:
//! the kernel deletes it, rules and all, the moment the process that created it (the agent's
//! `nft -i` child) exits, however it exits. A dead agent therefore never leaves a redirect to a
//! relay that is gone, and a migration started after that goes direct.
//!
//! The table holds two sets of destinations (IPv4 and IPv6 address with TCP port: the target
//! virt-handler's published migration ports) and, in a NAT output chain, one rule per family
//! that redirects a new connection to one of them to the relay's port in the same namespace,
//! except the relay's own connections, which carry a mark ([`BYPASS_MARK`]).
//! Each element carries a timeout, so even a live agent that lost track of a migration stops
//! redirecting it after the timeout.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::InterceptError;

/// The table's name (family `inet`).
pub const TABLE: &str = "commonground_relay";
const SET_V4: &str = "migration_targets_v4";
const SET_V6: &str = "migration_targets_v6";
/// The NAT output hook's priority for destination NAT.
const DSTNAT_PRIORITY: i32 = -100;

/// The packet mark (`SO_MARK`) of the relay's own connections from the namespace (a direct
/// delivery when the target relay cannot be used): they are never redirected.
pub const BYPASS_MARK: u32 = 0x6367_7270;

/// Commands that create the table (owned by the `nft` process that runs them) with its sets and
/// the redirect rules to `relay_port`.
pub fn create_table(relay_port: u16) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {TABLE} {{ flags owner; }}");
    let _ = writeln!(
        s,
        "add set inet {TABLE} {SET_V4} {{ type ipv4_addr . inet_service; flags timeout; }}"
    );
    let _ = writeln!(
        s,
        "add set inet {TABLE} {SET_V6} {{ type ipv6_addr . inet_service; flags timeout; }}"
    );
    let _ = writeln!(
        s,
        "add chain inet {TABLE} output {{ type nat hook output priority {DSTNAT_PRIORITY}; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add rule inet {TABLE} output meta mark {BYPASS_MARK:#x} accept"
    );
    let _ = writeln!(
        s,
        "add rule inet {TABLE} output ip daddr . tcp dport @{SET_V4} redirect to :{relay_port}"
    );
    let _ = writeln!(
        s,
        "add rule inet {TABLE} output ip6 daddr . tcp dport @{SET_V6} redirect to :{relay_port}"
    );
    s
}

fn set_of(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() {
        SET_V4
    } else {
        SET_V6
    }
}

fn element(addr: &SocketAddr) -> String {
    format!("{} . {}", addr.ip(), addr.port())
}

/// `<verb> element` of `addr` in its family's set, with `extra` after the element.
fn element_command(verb: &str, addr: &SocketAddr, extra: &str) -> String {
    format!(
        "{verb} element inet {TABLE} {} {{ {}{extra} }}\n",
        set_of(addr),
        element(addr)
    )
}

/// Commands that start redirecting new connections to `targets`, each for at most `timeout`
/// (whole seconds, at least one). An element already there gets the new timeout.
pub fn add_targets(targets: &[SocketAddr], timeout: Duration) -> String {
    let secs = timeout.as_secs().max(1);
    // Deleting first refreshes the timeout of an element added before (`add` keeps the old
    // one); a missing element makes `nft -i` print an error and go on.
    targets
        .iter()
        .map(|t| {
            element_command("delete", t, "")
                + &element_command("add", t, &format!(" timeout {secs}s"))
        })
        .collect()
}

/// Commands that stop redirecting new connections to `targets` (connections already redirected
/// keep going: NAT is decided once per connection).
pub fn remove_targets(targets: &[SocketAddr]) -> String {
    targets
        .iter()
        .map(|t| element_command("delete", t, ""))
        .collect()
}

/// The arguments of `nft` that list one of the two sets as JSON.
pub fn list_set_args(v6: bool) -> [&'static str; 6] {
    let set = if v6 { SET_V6 } else { SET_V4 };
    ["-j", "list", "set", "inet", TABLE, set]
}

/// The arguments of `nft` that list the table as text (which shows the `owner` flag).
pub fn list_table_args() -> [&'static str; 4] {
    ["list", "table", "inet", TABLE]
}

/// The destinations in `nft -j list set` output, with the seconds each has left (`None` when
/// the element has no timeout).
pub fn parse_set_elements(json: &str) -> Result<Vec<(SocketAddr, Option<u64>)>, InterceptError> {
    let bad =
        |what: &str| InterceptError::Nft(format!("unexpected `nft -j list set` output: {what}"));
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(&format!("not JSON ({e})")))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| bad("no nftables array"))?;
    let set = items
        .iter()
        .find_map(|i| i.get("set"))
        .ok_or_else(|| bad("no set"))?;
    let mut out = Vec::new();
    for e in set["elem"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let (val, left) = match e.get("elem") {
            Some(inner) => (&inner["val"], inner["expires"].as_u64()),
            None => (e, None),
        };
        let concat = val["concat"]
            .as_array()
            .ok_or_else(|| bad("element is not address . port"))?;
        let (Some(ip), Some(port)) = (
            concat
                .first()
                .and_then(|a| a.as_str())
                .and_then(|a| a.parse::<IpAddr>().ok()),
            concat
                .get(1)
                .and_then(|p| p.as_u64())
                .and_then(|p| u16::try_from(p).ok()),
        ) else {
            return Err(bad("element is not address . port"));
        };
        out.push((SocketAddr::new(ip, port), left));
    }
    Ok(out)
}

/// Whether `nft list table` text shows the table owned by a process (the `owner` flag).
pub fn table_is_owned(listing: &str) -> bool {
    listing
        .lines()
        .any(|l| l.trim() == "flags owner" || l.trim().starts_with("flags owner"))
}

/// Commands end with this listing request: its reply tells when `nft -i` has processed them.
pub fn list_table_command() -> String {
    format!("list table inet {TABLE}\n")
}

/// A command `nft -i` refused: the message and the command it echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftError {
    pub message: String,
    pub command: String,
}

impl NftError {
    /// Removing a destination that is not there (it expired, or was never added) is fine.
    pub fn is_expected(&self) -> bool {
        self.command.starts_with("delete element")
            && self.message.contains("No such file or directory")
    }
}

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (in `{}`)", self.message, self.command)
    }
}

/// What `nft -i` answered to a batch of commands ended by [`list_table_command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The table exists; its listing, and the commands refused on the way.
    Listing { text: String, errors: Vec<NftError> },
    /// The table does not exist.
    Missing { errors: Vec<NftError> },
}

/// Reads `nft -i`'s output (its stdout and stderr in one stream, in order) line by line until
/// the reply to [`list_table_command`] is complete. Each refused command prints three lines:
/// `Error: <message>`, the command, and a line of carets under the offending part.
#[derive(Debug, Default)]
pub struct ReplyReader {
    errors: Vec<NftError>,
    /// An `Error:` line read, and then the command line once read.
    error: Option<(String, Option<String>)>,
    listing: Option<String>,
}

impl ReplyReader {
    /// Feeds one line (without its newline); the reply once it is complete.
    pub fn feed(&mut self, line: &str) -> Option<Reply> {
        if let Some(listing) = &mut self.listing {
            listing.push_str(line);
            listing.push('\n');
            if line == "}" {
                let text = self.listing.take().unwrap_or_default();
                return Some(Reply::Listing {
                    text,
                    errors: std::mem::take(&mut self.errors),
                });
            }
            return None;
        }
        match self.error.take() {
            Some((message, None)) => {
                self.error = Some((message, Some(line.to_string())));
                None
            }
            Some((message, Some(command))) => {
                // The caret line: the error is complete.
                let missing = command.trim_end() == list_table_command().trim_end();
                self.errors.push(NftError { message, command });
                missing.then(|| Reply::Missing {
                    errors: std::mem::take(&mut self.errors),
                })
            }
            None => {
                if let Some(message) = line.strip_prefix("Error: ") {
                    self.error = Some((message.to_string(), None));
                } else if line.starts_with(&format!("table inet {TABLE} ")) {
                    self.listing = Some(format!("{line}\n"));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_owned_and_redirects_both_families_to_the_relay_port() {
        assert_eq!(
            create_table(7443),
            "add table inet commonground_relay { flags owner; }\n\
             add set inet commonground_relay migration_targets_v4 { type ipv4_addr . inet_service; flags timeout; }\n\
             add set inet commonground_relay migration_targets_v6 { type ipv6_addr . inet_service; flags timeout; }\n\
             add chain inet commonground_relay output { type nat hook output priority -100; policy accept; }\n\
             add rule inet commonground_relay output meta mark 0x63677270 accept\n\
             add rule inet commonground_relay output ip daddr . tcp dport @migration_targets_v4 redirect to :7443\n\
             add rule inet commonground_relay output ip6 daddr . tcp dport @migration_targets_v6 redirect to :7443\n"
        );
    }

    #[test]
    fn targets_are_added_with_a_fresh_timeout_and_removed_by_family() {
        let t: Vec<SocketAddr> = vec![
            "10.0.0.2:4444".parse().unwrap(),
            "[fd00::2]:49152".parse().unwrap(),
        ];
        assert_eq!(
            add_targets(&t, Duration::from_millis(90_500)),
            "delete element inet commonground_relay migration_targets_v4 { 10.0.0.2 . 4444 }\n\
             add element inet commonground_relay migration_targets_v4 { 10.0.0.2 . 4444 timeout 90s }\n\
             delete element inet commonground_relay migration_targets_v6 { fd00::2 . 49152 }\n\
             add element inet commonground_relay migration_targets_v6 { fd00::2 . 49152 timeout 90s }\n"
        );
        assert!(add_targets(&t[..1], Duration::ZERO).contains("timeout 1s"));
        assert_eq!(
            remove_targets(&t),
            "delete element inet commonground_relay migration_targets_v4 { 10.0.0.2 . 4444 }\n\
             delete element inet commonground_relay migration_targets_v6 { fd00::2 . 49152 }\n"
        );
        assert_eq!(remove_targets(&[]), "");
    }

    /// Output of nftables 1.0.6 for a set with two elements with timeouts.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"set": {"family": "inet", "name": "migration_targets_v4", "table": "commonground_relay", "type": ["ipv4_addr", "inet_service"], "handle": 1, "flags": ["timeout"], "elem": [{"elem": {"val": {"concat": ["10.0.0.2", 4444]}, "timeout": 3600, "expires": 3599}}, {"elem": {"val": {"concat": ["10.0.0.3", 5555]}, "timeout": 20, "expires": 19}}]}}]}"#;

    #[test]
    fn listed_elements_are_parsed_with_the_time_they_have_left() {
        assert_eq!(
            parse_set_elements(LISTED).unwrap(),
            vec![
                ("10.0.0.2:4444".parse().unwrap(), Some(3599)),
                ("10.0.0.3:5555".parse().unwrap(), Some(19)),
            ]
        );
        let empty = r#"{"nftables": [{"metainfo": {}}, {"set": {"family": "inet", "name": "migration_targets_v6", "table": "commonground_relay", "type": ["ipv6_addr", "inet_service"], "handle": 2, "flags": ["timeout"]}}]}"#;
        assert_eq!(parse_set_elements(empty).unwrap(), vec![]);
        let v6 = r#"{"nftables": [{"set": {"elem": [{"elem": {"val": {"concat": ["fd00::2", 4444]}, "timeout": 60, "expires": 59}}]}}]}"#;
        assert_eq!(
            parse_set_elements(v6).unwrap(),
            vec![("[fd00::2]:4444".parse().unwrap(), Some(59))]
        );
    }

    #[test]
    fn malformed_listings_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"nftables": []}"#,
            r#"{"nftables": [{"set": {"elem": [{"elem": {"val": "10.0.0.2"}}]}}]}"#,
            r#"{"nftables": [{"set": {"elem": [{"elem": {"val": {"concat": ["10.0.0.2", 70000]}}}]}}]}"#,
            r#"{"nftables": [{"set": {"elem": [{"elem": {"val": {"concat": ["nowhere", 1]}}}]}}]}"#,
        ] {
            assert!(parse_set_elements(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_end_with_the_table_listing_and_carry_the_refused_commands() {
        let out = "Error: Could not process rule: No such file or directory\n\
                   delete element inet commonground_relay migration_targets_v4 { 10.0.0.9 . 1 }\n\
                   \x20                                                         ^^^^^^^^^^^^\n\
                   Error: Could not process rule: Operation not permitted\n\
                   add element inet commonground_relay migration_targets_v4 { 10.0.0.9 . 1 timeout 30s }\n\
                   \x20                ^^^^^^^^^^^^^^^^^^\n\
                   table inet commonground_relay { # progname nft\n\
                   \tflags owner\n\
                   \n\
                   \tset migration_targets_v4 {\n\
                   \t}\n\
                   }\n\
                   leftover";
        let mut r = ReplyReader::default();
        let replies: Vec<Reply> = out.lines().filter_map(|l| r.feed(l)).collect();
        assert_eq!(replies.len(), 1, "{replies:?}");
        let Reply::Listing { text, errors } = &replies[0] else {
            panic!("{replies:?}");
        };
        assert!(table_is_owned(text));
        assert!(text.ends_with("\t}\n}\n"), "{text:?}");
        assert_eq!(errors.len(), 2);
        assert!(errors[0].is_expected(), "{:?}", errors[0]);
        assert!(!errors[1].is_expected(), "{:?}", errors[1]);
        assert_eq!(
            errors[1].message,
            "Could not process rule: Operation not permitted"
        );
        assert!(errors[1].command.starts_with("add element"));
    }

    #[test]
    fn a_missing_table_ends_the_reply_at_the_error_for_the_listing() {
        let out = "Error: No such file or directory\n\
                   list table inet commonground_relay\n\
                   \x20               ^^^^^^^^^^^^^^^^^^\n";
        let mut r = ReplyReader::default();
        let replies: Vec<Reply> = out.lines().filter_map(|l| r.feed(l)).collect();
        assert_eq!(replies.len(), 1);
        let Reply::Missing { errors } = &replies[0] else {
            panic!("{replies:?}");
        };
        assert_eq!(errors[0].command, "list table inet commonground_relay");
        // Another table's listing is not ours.
        let mut r = ReplyReader::default();
        assert!(r.feed("table inet other {").is_none());
        assert!(r.feed("}").is_none());
    }

    #[test]
    fn the_owner_flag_is_read_from_the_table_listing() {
        let owned =
            "table inet commonground_relay { # progname nft\n\tflags owner\n\n\tchain output {\n";
        assert!(table_is_owned(owned));
        assert!(!table_is_owned(
            "table inet commonground_relay {\n\tchain output {\n"
        ));
    }
}
