//! POSIX shell quoting, the one function every value sent to a shell goes through.

/// Quotes `value` so that a POSIX shell reads it back as one word, byte for byte.
///
/// Words made only of characters no shell treats specially stay as they are;
/// everything else is wrapped in single quotes, with each `'` written as `'\''`.
/// Inside single quotes nothing is special, so `$(...)`, backticks, `\`,
/// newlines and `!` arrive literally.
pub fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain {
        return value.to_string();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::quote;
    use std::process::Command;

    #[test]
    fn plain_words_stay_unquoted() {
        assert_eq!(quote("abc-1.2/x_y=z:w,@%+"), "abc-1.2/x_y=z:w,@%+");
    }

    #[test]
    fn empty_string_is_quoted() {
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn shell_reads_back_every_value_byte_identical() {
        let values = [
            "", "plain", "two words", "it's", "'", "''", "\"double\"", "$(touch /tmp/ringleader-pwned)",
            "`id`", "a\nb", "tab\there", "back\\slash", "!history", "*glob?[a]", "~user", "a=b=c",
            "-n", "ünïcödé", "semi;colon|pipe&amp>redirect<", "${HOME}", "\u{7f}control\u{1}",
        ];
        for value in values {
            let script = format!("printf '%s' {}", quote(value));
            let output = Command::new("/bin/sh").arg("-c").arg(&script).output().unwrap();
            assert!(output.status.success(), "{script}");
            assert_eq!(String::from_utf8(output.stdout).unwrap(), value, "{script}");
        }
    }
}
