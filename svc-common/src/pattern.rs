//! Path patterns for identities and key names (kms-server's policy, notes-store's callers): segments separated by `/`; a segment is a
//! literal, `*` (any one segment), `{name}` (any one segment, captured) or, last only, `**`
//! (the rest: zero or more segments). Captures of an identity pattern can be substituted into
//! key patterns and context conditions of the same rule.

use std::collections::BTreeMap;

/// Values captured by `{name}` segments.
pub type Captures = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Rest,
    Capture(String),
}

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "*" => Segment::Any,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("{text:?}: `**` may only be the last segment")),
                p if p.starts_with('{') && p.ends_with('}') && is_name(&p[1..p.len() - 1]) => {
                    Segment::Capture(p[1..p.len() - 1].to_string())
                }
                p if p.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "{text:?}: segment {p:?} mixes a wildcard with text"
                    ))
                }
                p => Segment::Literal(p.to_string()),
            };
            segments.push(seg);
        }
        Ok(Pattern {
            text: text.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The names this pattern captures.
    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Capture(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Matches `value`; on success returns `known` extended with this pattern's captures. A
    /// name already in `known` must match the same segment value (so `{site}` taken from the
    /// identity constrains the key name).
    pub fn matches(&self, value: &str, known: &Captures) -> Option<Captures> {
        let parts: Vec<&str> = value.split('/').collect();
        let mut caps = known.clone();
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Rest => return Some(caps),
                _ if i >= parts.len() => return None,
                Segment::Literal(l) if l == parts[i] => {}
                Segment::Literal(_) => return None,
                Segment::Any if !parts[i].is_empty() => {}
                Segment::Any => return None,
                Segment::Capture(name) => {
                    if parts[i].is_empty() {
                        return None;
                    }
                    match caps.get(name) {
                        Some(v) if v != parts[i] => return None,
                        Some(_) => {}
                        None => {
                            caps.insert(name.clone(), parts[i].to_string());
                        }
                    }
                }
            }
        }
        (parts.len() == self.segments.len()).then_some(caps)
    }
}

/// A context value condition: a literal, `{name}` (a captured value) or `*` (present, any value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueTemplate {
    Literal(String),
    Capture(String),
    Any,
}

impl ValueTemplate {
    pub fn parse(text: &str) -> Result<ValueTemplate, String> {
        if text == "*" {
            return Ok(ValueTemplate::Any);
        }
        if let Some(name) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            if is_name(name) {
                return Ok(ValueTemplate::Capture(name.to_string()));
            }
        }
        if text.contains(['*', '{', '}']) {
            return Err(format!("context value {text:?} mixes a wildcard with text"));
        }
        Ok(ValueTemplate::Literal(text.to_string()))
    }

    /// The required value (`None` = any value), given the rule's captures.
    pub fn resolve(&self, caps: &Captures) -> Option<String> {
        match self {
            ValueTemplate::Literal(l) => Some(l.clone()),
            ValueTemplate::Capture(n) => Some(caps.get(n).cloned().unwrap_or_default()),
            ValueTemplate::Any => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, v: &str) -> Option<Captures> {
        Pattern::parse(p).unwrap().matches(v, &Captures::new())
    }

    #[test]
    fn exact_and_wildcards() {
        assert!(m("notes/a", "notes/a").is_some());
        assert!(m("notes/a", "notes/b").is_none());
        assert!(m("notes/a", "notes/a/x").is_none());
        assert!(m("notes/*", "notes/a").is_some());
        assert!(m("notes/*", "notes/a/b").is_none());
        assert!(m("notes/*", "notes").is_none());
        assert!(m("notes/*", "notes/").is_none());
        assert!(m("notes/**", "notes/a/b/c").is_some());
        assert!(m("notes/**", "notes").is_some());
        assert!(m("**", "anything/at/all").is_some());
        assert!(m("notes/**", "other/a").is_none());
    }

    #[test]
    fn captures() {
        let caps = m(
            "spiffe://dev.clinic/site/{site}/notes-store",
            "spiffe://dev.clinic/site/a/notes-store",
        )
        .unwrap();
        assert_eq!(caps.get("site").map(String::as_str), Some("a"));
        assert!(m(
            "spiffe://dev.clinic/site/{site}/notes-store",
            "spiffe://dev.clinic/site/a/b/notes-store"
        )
        .is_none());
        // A known capture constrains the match.
        let key = Pattern::parse("notes/{site}/*").unwrap();
        assert!(key.matches("notes/a/x", &caps).is_some());
        assert!(key.matches("notes/b/x", &caps).is_none());
        // The same name twice must match the same value.
        assert!(m("{x}/{x}", "a/a").is_some());
        assert!(m("{x}/{x}", "a/b").is_none());
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in [
            "",
            "notes/**/x",
            "notes/a*",
            "notes/{site",
            "notes/{}",
            "x{y}",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ValueTemplate::parse("a*").is_err());
        assert_eq!(
            ValueTemplate::parse("{site}").unwrap(),
            ValueTemplate::Capture("site".into())
        );
        assert_eq!(ValueTemplate::parse("*").unwrap(), ValueTemplate::Any);
    }
}
