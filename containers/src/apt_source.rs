//! The Debian mirror and suite for debootstrap, read from the machine's apt
//! configuration so that the repository names no mirror.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The archive debootstrap downloads packages from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// Archive root, e.g. the `URIs:` value of a deb822 entry.
    pub mirror: String,
    /// Release name such as `bookworm`.
    pub suite: String,
    /// Keyring that signs the archive, when the entry names one that exists.
    pub keyring: Option<PathBuf>,
}

const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

impl AptSource {
    /// Find the source: `RINGLEADER_DEBIAN_MIRROR` and `RINGLEADER_DEBIAN_SUITE`
    /// when both are set, else the first Debian `main` entry of a plain suite
    /// (not `-updates` or `-security`) in the apt configuration.
    pub fn detect() -> Result<AptSource> {
        if let (Ok(mirror), Ok(suite)) = (
            std::env::var("RINGLEADER_DEBIAN_MIRROR"),
            std::env::var("RINGLEADER_DEBIAN_SUITE"),
        ) {
            return Ok(AptSource { mirror, suite, keyring: None });
        }

        let mut files = vec![PathBuf::from(SOURCES_LIST)];
        if let Ok(entries) = std::fs::read_dir(SOURCES_DIR) {
            let mut listed: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
            listed.sort();
            files.extend(listed);
        }

        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else { continue };
            let found = match file.extension().and_then(|extension| extension.to_str()) {
                Some("sources") => parse_deb822(&text),
                Some("list") => parse_one_line(&text),
                _ => None,
            };
            if let Some(source) = found {
                return Ok(source.with_existing_keyring());
            }
        }

        Err(Error::NoAptSource {
            searched: format!("{SOURCES_LIST} and {SOURCES_DIR}/*.{{list,sources}}"),
        })
    }

    fn with_existing_keyring(mut self) -> AptSource {
        if self.keyring.as_deref().is_some_and(|keyring| !Path::new(keyring).is_file()) {
            self.keyring = None;
        }
        self
    }
}

/// Returns whether debootstrap can install `suite`: a release name, not an update pocket.
fn is_base_suite(suite: &str) -> bool {
    !suite.is_empty() && !suite.contains('-') && !suite.contains('/')
}

fn is_http(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://")
}

/// Parse the deb822 format of `*.sources` files: stanzas of `Field: value`
/// separated by blank lines.
fn parse_deb822(text: &str) -> Option<AptSource> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| -> Option<String> {
            stanza.lines().find_map(|line| {
                if line.starts_with('#') {
                    return None;
                }
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
            })
        };

        let types = field("Types").unwrap_or_default();
        let enabled = field("Enabled").is_none_or(|value| !value.eq_ignore_ascii_case("no"));
        let components = field("Components").unwrap_or_default();
        if !enabled || !types.split_whitespace().any(|kind| kind == "deb") {
            continue;
        }
        if !components.split_whitespace().any(|component| component == "main") {
            continue;
        }
        let Some(mirror) = field("URIs").and_then(|uris| uris.split_whitespace().find(|uri| is_http(uri)).map(String::from))
        else {
            continue;
        };
        let Some(suite) = field("Suites").and_then(|suites| suites.split_whitespace().find(|suite| is_base_suite(suite)).map(String::from))
        else {
            continue;
        };
        let keyring = field("Signed-By").filter(|value| value.starts_with('/')).map(PathBuf::from);
        return Some(AptSource { mirror, suite, keyring });
    }
    None
}

/// Parse one-line entries: `deb [options] URI suite component...`.
fn parse_one_line(text: &str) -> Option<AptSource> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else { continue };

        let mut keyring = None;
        let rest = rest.trim_start();
        let rest = if let Some(options) = rest.strip_prefix('[') {
            let (options, after) = options.split_once(']')?;
            keyring = options
                .split_whitespace()
                .find_map(|option| option.strip_prefix("signed-by="))
                .map(PathBuf::from);
            after
        } else {
            rest
        };

        let mut words = rest.split_whitespace();
        let (Some(mirror), Some(suite)) = (words.next(), words.next()) else { continue };
        let has_main = words.any(|component| component == "main");
        if is_http(mirror) && is_base_suite(suite) && has_main {
            return Some(AptSource { mirror: mirror.to_string(), suite: suite.to_string(), keyring });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // The archive host below is a placeholder from the reserved example domain.
    const DEB822: &str = "Types: deb\n\
# http://snapshot.example.org/archive/debian/20250520T000000Z\n\
URIs: http://mirror.example.org/debian\n\
Suites: trixie trixie-updates\n\
Components: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
\n\
Types: deb\n\
URIs: http://mirror.example.org/debian-security\n\
Suites: trixie-security\n\
Components: main\n";

    #[test]
    fn deb822_picks_the_base_suite() {
        let source = parse_deb822(DEB822).expect("entry with a base suite");
        assert_eq!(source.mirror, "http://mirror.example.org/debian");
        assert_eq!(source.suite, "trixie");
        assert_eq!(source.keyring.as_deref(), Some(Path::new("/usr/share/keyrings/debian-archive-keyring.gpg")));
    }

    #[test]
    fn deb822_skips_security_only_and_disabled_entries() {
        let text = "Types: deb\nURIs: http://mirror.example.org/debian-security\nSuites: trixie-security\nComponents: main\n\n\
Types: deb\nEnabled: no\nURIs: http://mirror.example.org/debian\nSuites: trixie\nComponents: main\n";
        assert_eq!(parse_deb822(text), None);
    }

    #[test]
    fn one_line_entry_with_options() {
        let text = "# comment\ndeb-src http://mirror.example.org/debian trixie main\n\
deb [arch=amd64 signed-by=/etc/keyring.gpg] http://mirror.example.org/debian trixie main contrib\n";
        let source = parse_one_line(text).expect("deb entry");
        assert_eq!(source.mirror, "http://mirror.example.org/debian");
        assert_eq!(source.suite, "trixie");
        assert_eq!(source.keyring.as_deref(), Some(Path::new("/etc/keyring.gpg")));
    }

    #[test]
    fn one_line_entry_without_main_is_skipped() {
        assert_eq!(parse_one_line("deb http://mirror.example.org/other stable extras\n"), None);
    }
}
