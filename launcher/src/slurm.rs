//! Hosts of a Slurm allocation, for launches inside `salloc` or `sbatch`
//! that give neither `--hosts` nor `--hostfile`.
//!
//! Slurm describes the allocation in the job's environment:
//! `SLURM_JOB_NODELIST` lists the nodes in host-range syntax (see
//! [`crate::hostlist`]), and `SLURM_TASKS_PER_NODE` gives the task count of
//! each node in its compressed form, where `2(x3),1` means 2, 2, 2 and 1.
//! `SLURM_NTASKS_PER_NODE`, set only when the job asked for
//! `--ntasks-per-node`, is read when `SLURM_TASKS_PER_NODE` is absent.

use crate::hostlist::{self, HostlistError};

/// The variable that marks a launch inside a Slurm allocation.
pub const NODELIST_VAR: &str = "SLURM_JOB_NODELIST";

/// An allocation whose variables cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlurmError {
    #[error("{NODELIST_VAR}={value:?} is invalid: {source}")]
    Nodelist {
        value: String,
        #[source]
        source: HostlistError,
    },
    #[error("{var}={value:?} is invalid: {reason}\nhint: Slurm writes it as counts such as 2(x3),1")]
    Tasks { var: &'static str, value: String, reason: String },
    #[error("{var}={value:?} lists {counts} nodes but {NODELIST_VAR} has {nodes}")]
    CountMismatch { var: &'static str, value: String, counts: usize, nodes: usize },
}

/// Reads the allocation: each node with its number of tasks, in Slurm's
/// order. Returns `None` outside an allocation (no `SLURM_JOB_NODELIST`).
pub fn allocation(lookup_env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Vec<(String, u32)>>, SlurmError> {
    let Some(nodelist) = lookup_env(NODELIST_VAR).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let nodes = hostlist::expand(&nodelist).map_err(|source| SlurmError::Nodelist { value: nodelist.clone(), source })?;

    let counts = ["SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"]
        .into_iter()
        .find_map(|var| lookup_env(var).filter(|v| !v.is_empty()).map(|value| (var, value)));
    let counts = match counts {
        None => vec![1; nodes.len()],
        Some((var, value)) => {
            let mut counts = tasks_per_node(&value).map_err(|reason| SlurmError::Tasks { var, value: value.clone(), reason })?;
            // SLURM_NTASKS_PER_NODE is one number that applies to every node.
            if counts.len() == 1 && nodes.len() > 1 {
                counts = vec![counts[0]; nodes.len()];
            }
            if counts.len() != nodes.len() {
                return Err(SlurmError::CountMismatch { var, value, counts: counts.len(), nodes: nodes.len() });
            }
            counts
        }
    };
    Ok(Some(nodes.into_iter().zip(counts).collect()))
}

/// Parses Slurm's compressed task counts, such as `2(x3),1` or `4`.
pub fn tasks_per_node(text: &str) -> Result<Vec<u32>, String> {
    let mut counts = Vec::new();
    for (position, item) in text.split(',').enumerate() {
        let (count, repeat) = match item.split_once('(') {
            None => (item, "1"),
            Some((count, rest)) => {
                let repeat = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("item {position} ({item:?}) must look like N or N(xM)"))?;
                (count, repeat)
            }
        };
        let count = parse_positive(count).ok_or_else(|| format!("item {position} ({item:?}) has no positive task count"))?;
        let repeat = parse_positive(repeat).ok_or_else(|| format!("item {position} ({item:?}) has no positive repeat count"))?;
        if counts.len() + repeat as usize > hostlist::MAX_HOSTS {
            return Err(format!("more than {} nodes", hostlist::MAX_HOSTS));
        }
        counts.extend(std::iter::repeat_n(count, repeat as usize));
    }
    Ok(counts)
}

fn parse_positive(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
    }

    #[test]
    fn tasks_per_node_table() {
        let cases: &[(&str, &[u32])] = &[
            ("1", &[1]),
            ("4", &[4]),
            ("2(x3),1", &[2, 2, 2, 1]),
            ("1,2(x2)", &[1, 2, 2]),
            ("8(x1)", &[8]),
        ];
        for (text, expected) in cases {
            assert_eq!(tasks_per_node(text).as_deref(), Ok(*expected), "{text}");
        }
    }

    #[test]
    fn malformed_tasks_per_node_table() {
        let cases = [
            ("", "item 0 (\"\") has no positive task count"),
            ("0", "no positive task count"),
            ("2(x0)", "no positive repeat count"),
            ("2(3)", "must look like N or N(xM)"),
            ("2(x3", "must look like N or N(xM)"),
            ("2,,1", "item 1"),
            ("-1", "no positive task count"),
            ("two", "no positive task count"),
            ("1(x999999999)", "more than 100000 nodes"),
        ];
        for (text, expected) in cases {
            let error = tasks_per_node(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn allocation_pairs_nodes_with_counts() {
        let vars = [("SLURM_JOB_NODELIST", "a[1-3,5],b-[01-02]"), ("SLURM_TASKS_PER_NODE", "2(x3),1(x3)")];
        let hosts = allocation(&env(&vars)).unwrap().unwrap();
        let expected = [("a1", 2), ("a2", 2), ("a3", 2), ("a5", 1), ("b-01", 1), ("b-02", 1)];
        let expected: Vec<(String, u32)> = expected.iter().map(|(h, n)| (h.to_string(), *n)).collect();
        assert_eq!(hosts, expected);
    }

    #[test]
    fn ntasks_per_node_applies_to_every_node() {
        let vars = [("SLURM_JOB_NODELIST", "n[1-2]"), ("SLURM_NTASKS_PER_NODE", "3")];
        let hosts = allocation(&env(&vars)).unwrap().unwrap();
        assert_eq!(hosts, [("n1".to_string(), 3), ("n2".to_string(), 3)]);
    }

    #[test]
    fn nodes_without_counts_get_one_task() {
        let vars = [("SLURM_JOB_NODELIST", "n[1-2]")];
        let hosts = allocation(&env(&vars)).unwrap().unwrap();
        assert_eq!(hosts, [("n1".to_string(), 1), ("n2".to_string(), 1)]);
    }

    #[test]
    fn no_allocation_outside_slurm() {
        assert_eq!(allocation(&env(&[])), Ok(None));
    }

    #[test]
    fn allocation_errors() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("SLURM_JOB_NODELIST", "n[1-")], "SLURM_JOB_NODELIST=\"n[1-\" is invalid: \"n[1-\": the '[' at byte 1 is never closed"),
            (&[("SLURM_JOB_NODELIST", "n[1-2]"), ("SLURM_TASKS_PER_NODE", "2(x3)")], "SLURM_TASKS_PER_NODE=\"2(x3)\" lists 3 nodes but SLURM_JOB_NODELIST has 2"),
            (&[("SLURM_JOB_NODELIST", "n1"), ("SLURM_TASKS_PER_NODE", "x")], "SLURM_TASKS_PER_NODE=\"x\" is invalid: item 0"),
        ];
        for (vars, expected) in cases {
            let error = allocation(&env(vars)).unwrap_err().to_string();
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
    }
}
