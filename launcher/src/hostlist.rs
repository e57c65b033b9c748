//! Host ranges as clusters write them: `node[01-04]`, `n[1-3,7]`,
//! `rack[1-2]-gpu[1-8]`, and comma-separated lists of them.
//!
//! This is the syntax of Slurm's `SLURM_JOB_NODELIST` and of pdsh/ClusterShell
//! host lists: an item is literal text with bracket groups, each group a
//! comma-separated list of numbers `N` or ranges `N-M`. A range keeps the
//! zero padding of its first number (`[08-10]` gives `08 09 10`). Several
//! groups in one item expand to every combination, in order. Commas inside
//! brackets belong to the group; commas outside separate items.

/// Upper bound on the hosts one list may expand to, so that a typo such as
/// `n[1-99999999]` is an error rather than an allocation of gigabytes.
pub const MAX_HOSTS: usize = 100_000;

/// A malformed host list, with the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostlistError {
    #[error("host {position} is empty; write hosts as a comma-separated list such as node1,node2 or node[1-2]")]
    EmptyItem { position: usize },
    #[error("{item:?}: the '[' at byte {offset} is never closed")]
    Unclosed { item: String, offset: usize },
    #[error("{item:?}: ']' at byte {offset} has no matching '['")]
    UnmatchedClose { item: String, offset: usize },
    #[error("{item:?}: brackets cannot nest")]
    Nested { item: String },
    #[error("{item:?}: range element {element:?} {reason}")]
    BadRange { item: String, element: String, reason: &'static str },
    #[error("the host list expands to more than {MAX_HOSTS} hosts")]
    TooMany,
}

/// Expands a comma-separated list of hosts and host ranges, in order.
/// Duplicates stay: a host listed twice runs two ranks, as with `--hosts a,a`.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let mut hosts = Vec::new();
    for (position, item) in split_top_level(list)?.into_iter().enumerate() {
        if item.is_empty() {
            return Err(HostlistError::EmptyItem { position });
        }
        for host in expand_item(item)? {
            if hosts.len() == MAX_HOSTS {
                return Err(HostlistError::TooMany);
            }
            hosts.push(host);
        }
    }
    Ok(hosts)
}

/// Returns whether `text` contains a bracket group, so it names several hosts.
pub fn is_range(text: &str) -> bool {
    text.contains('[')
}

/// Splits at commas outside brackets and checks that brackets pair up.
fn split_top_level(list: &str) -> Result<Vec<&str>, HostlistError> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut open_at = 0;
    let mut start = 0;
    for (offset, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => {
                return Err(HostlistError::Nested { item: item_around(list, offset).to_string() })
            }
            '[' => {
                depth = 1;
                open_at = offset;
            }
            ']' if depth == 0 => {
                return Err(HostlistError::UnmatchedClose {
                    item: item_around(list, offset).to_string(),
                    offset: offset - item_start(list, offset),
                })
            }
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(&list[start..offset]);
                start = offset + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(HostlistError::Unclosed {
            item: list[start..].to_string(),
            offset: open_at - start,
        });
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Start of the top-level item containing `offset`, for error messages only.
fn item_start(list: &str, offset: usize) -> usize {
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list[..offset].char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => start = i + 1,
            _ => {}
        }
    }
    start
}

fn item_around(list: &str, offset: usize) -> &str {
    let start = item_start(list, offset);
    let end = list[offset..].find(',').map_or(list.len(), |i| offset + i);
    &list[start..end]
}

/// Expands one item such as `rack[1-2]-gpu[01-02]`, whose brackets are balanced.
fn expand_item(item: &str) -> Result<Vec<String>, HostlistError> {
    let mut prefixes = vec![String::new()];
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').expect("split_top_level checked that brackets close");
        let literal = &rest[..open];
        let values = expand_group(item, &rest[open + 1..close])?;
        if prefixes.len().saturating_mul(values.len()) > MAX_HOSTS {
            return Err(HostlistError::TooMany);
        }
        prefixes = prefixes
            .iter()
            .flat_map(|prefix| values.iter().map(move |value| format!("{prefix}{literal}{value}")))
            .collect();
        rest = &rest[close + 1..];
    }
    Ok(prefixes.into_iter().map(|prefix| prefix + rest).collect())
}

/// Expands the inside of one bracket group, such as `1-3,7` or `08-10`.
fn expand_group(item: &str, group: &str) -> Result<Vec<String>, HostlistError> {
    let bad = |element: &str, reason| HostlistError::BadRange {
        item: item.to_string(),
        element: element.to_string(),
        reason,
    };
    let mut values = Vec::new();
    for element in group.split(',') {
        let (first, last) = match element.split_once('-') {
            Some((first, last)) => (first, last),
            None => (element, element),
        };
        if element.is_empty() {
            return Err(bad(element, "is empty; write numbers or ranges such as [1-3,7]"));
        }
        let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !is_number(first) || !is_number(last) {
            return Err(bad(element, "must be a number or a range of numbers such as 1-4"));
        }
        let (Ok(low), Ok(high)) = (first.parse::<u64>(), last.parse::<u64>()) else {
            return Err(bad(element, "has a number too large"));
        };
        if low > high {
            return Err(bad(element, "counts down; write the lower number first"));
        }
        if high - low >= MAX_HOSTS as u64 || values.len() + (high - low) as usize >= MAX_HOSTS {
            return Err(HostlistError::TooMany);
        }
        let width = first.len();
        values.extend((low..=high).map(|n| format!("{n:0width$}")));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_table() {
        let cases: &[(&str, &[&str])] = &[
            ("node1", &["node1"]),
            ("a,b,a", &["a", "b", "a"]),
            ("node[01-04]", &["node01", "node02", "node03", "node04"]),
            ("n[1-3,7]", &["n1", "n2", "n3", "n7"]),
            ("n[8-11]", &["n8", "n9", "n10", "n11"]),
            ("n[08-10]", &["n08", "n09", "n10"]),
            ("n[5]", &["n5"]),
            ("a[1-3,5],b-[01-02]", &["a1", "a2", "a3", "a5", "b-01", "b-02"]),
            ("rack[1-2]-gpu[1-2]", &["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"]),
            ("[1-2]x", &["1x", "2x"]),
            ("10.0.0.[1-3]", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            ("user@n[1-2]", &["user@n1", "user@n2"]),
            ("::1", &["::1"]),
            ("x,n[1-2],y", &["x", "n1", "n2", "y"]),
        ];
        for (list, expected) in cases {
            assert_eq!(expand(list).unwrap(), *expected, "{list}");
        }
    }

    #[test]
    fn malformed_table() {
        let cases = [
            ("", "host 0 is empty"),
            ("a,,b", "host 1 is empty"),
            ("a,", "host 1 is empty"),
            ("n[1-3", "\"n[1-3\": the '[' at byte 1 is never closed"),
            ("a,n[1,2", "\"n[1,2\": the '[' at byte 1 is never closed"),
            ("n1-3]", "\"n1-3]\": ']' at byte 4 has no matching '['"),
            ("n[[1]]", "brackets cannot nest"),
            ("n[]", "range element \"\" is empty"),
            ("n[1,]", "range element \"\" is empty"),
            ("n[3-1]", "range element \"3-1\" counts down"),
            ("n[a-b]", "range element \"a-b\" must be a number"),
            ("n[1-]", "range element \"1-\" must be a number"),
            ("n[-2]", "range element \"-2\" must be a number"),
            ("n[1-2-3]", "range element \"1-2-3\" must be a number"),
            ("n[ 1]", "must be a number"),
            ("n[99999999999999999999]", "too large"),
            ("n[1-99999999]", "more than 100000 hosts"),
            ("a[1-1000]b[1-1000]", "more than 100000 hosts"),
        ];
        for (list, expected) in cases {
            let error = expand(list).unwrap_err().to_string();
            assert!(error.contains(expected), "{list:?}: {error}");
        }
    }

    #[test]
    fn range_detection() {
        assert!(is_range("node[1-2]"));
        assert!(!is_range("node1"));
    }
}
