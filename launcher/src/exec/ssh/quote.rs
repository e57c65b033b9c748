//! Quoting for the POSIX shell on the remote host, and checks on values that
//! reach ssh's command line.

/// Quotes `value` as one POSIX shell word that expands to exactly `value`.
///
/// This is the launcher's one quoting function, [`crate::shell::quote`],
/// under the name the ssh transport uses. A shell word cannot contain a NUL
/// byte, so callers reject values that contain one.
pub fn sh_quote(value: &str) -> String {
    crate::shell::quote(value)
}

/// Checks that `value` can travel through [`sh_quote`]: it contains no NUL byte.
pub(crate) fn check_shell_value(what: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!(
            "{what} contains a NUL byte, which a shell cannot pass on"
        ));
    }
    Ok(())
}

/// Checks that `name` is a portable environment variable name
/// (`[A-Za-z_][A-Za-z0-9_]*`), so `export NAME=...` cannot be misread.
pub(crate) fn check_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid_start = chars
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_');
    if valid_start && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
        Ok(())
    } else {
        Err(format!(
            "invalid environment variable name {name:?}: use letters, digits and '_', not starting with a digit"
        ))
    }
}

/// A host, user name or similar value that ssh would misread.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ssh {field} {value:?}: {reason}")]
pub struct InvalidHost {
    /// Kind of value: "host" or "user".
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Rejects a host value that ssh could read as an option or that is not one
/// plain word: empty, starting with `-` (`-oProxyCommand=...` would run a
/// local command), with a login part after `@` that starts with `-`, or
/// containing whitespace, control characters or shell metacharacters (ssh
/// substitutes the host for `%h` in a configured `ProxyCommand`, which runs
/// through a shell). `user@host`, IPv6 addresses and ssh config aliases pass.
pub fn validate_host(host: &str) -> Result<(), InvalidHost> {
    validate_word("host", host)?;
    if host
        .rsplit('@')
        .next()
        .is_some_and(|name| name.starts_with('-'))
    {
        return Err(InvalidHost {
            field: "host",
            value: host.to_owned(),
            reason: "the host name after '@' starts with '-'",
        });
    }
    Ok(())
}

/// Applies the same rules as [`validate_host`] to a login user name.
pub(crate) fn validate_user(user: &str) -> Result<(), InvalidHost> {
    validate_word("user", user)
}

/// Characters a host or user may contain besides letters and digits.
const WORD_PUNCTUATION: &str = "._-@:%[]+";

fn validate_word(field: &'static str, value: &str) -> Result<(), InvalidHost> {
    let reason = if value.is_empty() {
        Some("it is empty")
    } else if value.starts_with('-') {
        Some("it starts with '-', so ssh would read it as an option")
    } else if value.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else if value.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if !value
        .chars()
        .all(|ch| ch.is_alphanumeric() || WORD_PUNCTUATION.contains(ch))
    {
        Some("it contains a character other than letters, digits and ._-@:%[]+")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidHost {
            field,
            value: value.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `printf '%s\0' WORD...` through /bin/sh and returns the words it received.
    fn round_trip(values: &[&str]) -> Vec<String> {
        let words: Vec<String> = values.iter().map(|value| sh_quote(value)).collect();
        let script = format!("printf '%s\\0' {}", words.join(" "));
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("/bin/sh runs");
        assert!(output.status.success(), "script failed: {script}");
        let text = String::from_utf8(output.stdout).expect("utf-8 output");
        text.split_terminator('\0').map(str::to_owned).collect()
    }

    #[test]
    fn quoted_words_reach_the_shell_unchanged() {
        let cases = [
            "",
            "plain",
            "two words",
            "it's",
            "''",
            "'\\''",
            "$(touch /tmp/ringleader-quote-pwned)",
            "`touch /tmp/ringleader-quote-pwned`",
            "${HOME}",
            "$HOME",
            "a\nb\n",
            "back\\slash\\",
            "x=y",
            "; rm -rf /tmp/nothing; #",
            "|&<>*?[]{}~!",
            "-oProxyCommand=touch /tmp/ringleader-quote-pwned",
            "tab\there",
            "unicode é ∑ 🚀",
            "\u{1}\u{7f}",
        ];
        assert_eq!(round_trip(&cases), cases);
        assert!(!std::path::Path::new("/tmp/ringleader-quote-pwned").exists());
    }

    #[test]
    fn empty_value_quotes_to_empty_word() {
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn nul_byte_is_rejected() {
        assert!(check_shell_value("argument 1", "a\0b").is_err());
        assert!(check_shell_value("argument 1", "ab").is_ok());
    }

    #[test]
    fn env_names_are_checked() {
        assert!(check_env_name("MLX_RANK").is_ok());
        assert!(check_env_name("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A B", "A=B", "A;B", "$(x)"] {
            assert!(check_env_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hosts_that_look_like_options_are_rejected() {
        for bad in [
            "",
            "-oProxyCommand=touch /tmp/x",
            "-p",
            "host name",
            "host\tname",
            "host\nname",
            "host\u{7}",
            "user@-oProxyCommand=x",
            "host;touch x",
            "$(touch x)",
            "`x`",
            "a|b",
            "a'b",
        ] {
            assert!(validate_host(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "node1",
            "user@node1",
            "10.0.0.1",
            "::1",
            "fe80::1%eth0",
            "node-1.example",
            "node_2",
        ] {
            assert!(validate_host(good).is_ok(), "{good:?} rejected");
        }
    }
}
