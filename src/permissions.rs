//! Who may subscribe and publish where: topic namespaces (`[[namespace]]` in the config
//! file, matched by the longest topic prefix) and the grants a client's token carries
//! (`topics`, `publish`: exact names or `prefix*`). A grant always allows; without one
//! the topic's namespace decides. Topics in no namespace follow the default namespace,
//! which lets anyone subscribe and takes `client_publish` from the top-level option,
//! as ringway did before namespaces; a namespace with `prefix = ""` replaces it. A
//! declared namespace is closed unless it says otherwise: no anonymous subscribers and
//! no client publishing without a grant.

use serde::Deserialize;

/// One `[[namespace]]` of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Topics starting with this belong here (the longest matching prefix wins; `""`
    /// is the default namespace).
    pub prefix: String,
    /// Anonymous clients may subscribe without a grant.
    #[serde(default)]
    pub anonymous: bool,
    /// Identified clients (a token with `sub`) may subscribe without a grant; `false`
    /// makes the namespace grant-only.
    #[serde(default = "yes")]
    pub users: bool,
    /// Any client may publish without a grant (default false). `None` only in the
    /// built-in default namespace, which follows the top-level `client_publish`.
    #[serde(default = "no")]
    pub client_publish: Option<bool>,
}

fn yes() -> bool {
    true
}

fn no() -> Option<bool> {
    Some(false)
}

/// The namespace that applies when none matches and no `prefix = ""` is declared.
static DEFAULT: Namespace = Namespace {
    prefix: String::new(),
    anonymous: true,
    users: true,
    client_publish: None,
};

/// What a token grants beyond its namespaces; `None` is a claim the token lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// `topics`: may subscribe.
    pub topics: Option<Box<[Box<str>]>>,
    /// `publish`: may publish.
    pub publish: Option<Box<[Box<str>]>>,
    /// `subscribe`: joined at connect.
    pub subscribe: Option<Box<[Box<str>]>>,
}

impl Grants {
    pub fn is_empty(&self) -> bool {
        self.topics.is_none() && self.publish.is_none() && self.subscribe.is_none()
    }

    /// As a connection keeps them: boxed, and nothing when they grant nothing.
    pub fn kept(self) -> Option<Box<Self>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

/// Whether grant `pattern` (an exact topic, or `prefix*`) covers `topic`.
pub fn covers(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// Checks a claim's patterns: `*` only as the last character. Returns the first bad one.
pub fn check_patterns(patterns: &[String]) -> Result<(), &str> {
    match patterns
        .iter()
        .find(|p| p.is_empty() || p.trim_end_matches('*').contains('*') || p.ends_with("**"))
    {
        Some(bad) => Err(bad),
        None => Ok(()),
    }
}

fn granted(list: Option<&[Box<str>]>, topic: &str) -> bool {
    list.is_some_and(|l| l.iter().any(|p| covers(p, topic)))
}

/// The namespace `topic` belongs to.
pub fn namespace_of<'a>(namespaces: &'a [Namespace], topic: &str) -> &'a Namespace {
    namespaces
        .iter()
        .filter(|n| topic.starts_with(n.prefix.as_str()))
        .max_by_key(|n| n.prefix.len())
        .unwrap_or(&DEFAULT)
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not granted, and the topic's namespace does not allow it (`forbidden`).
    Forbidden,
    /// Client publishing is off (`client_publish = false`, no namespace says otherwise,
    /// and the token has no `publish` claim): `publish_forbidden`, as before namespaces.
    PublishOff,
}

/// The rules in force: the namespaces and the top-level `client_publish`.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub namespaces: &'a [Namespace],
    pub client_publish: bool,
}

impl Rules<'_> {
    /// May a client (identified by a token, or anonymous) with `grants` subscribe to
    /// `topic`?
    pub fn subscribe(
        &self,
        identified: bool,
        grants: Option<&Grants>,
        topic: &str,
    ) -> Result<(), Refused> {
        if granted(grants.and_then(|g| g.topics.as_deref()), topic) {
            return Ok(());
        }
        let ns = namespace_of(self.namespaces, topic);
        let open = if identified { ns.users } else { ns.anonymous };
        if open {
            Ok(())
        } else {
            Err(Refused::Forbidden)
        }
    }

    /// May a client with `grants` publish to `topic`?
    pub fn publish(&self, grants: Option<&Grants>, topic: &str) -> Result<(), Refused> {
        let claim = grants.and_then(|g| g.publish.as_deref());
        if granted(claim, topic) {
            return Ok(());
        }
        match namespace_of(self.namespaces, topic).client_publish {
            Some(true) => Ok(()),
            Some(false) => Err(Refused::Forbidden),
            None if self.client_publish => Ok(()),
            None if claim.is_some() => Err(Refused::Forbidden),
            None => Err(Refused::PublishOff),
        }
    }
}

/// Checks the namespaces of a configuration: a prefix at most once.
pub fn validate(namespaces: &[Namespace]) -> Result<(), String> {
    for (i, n) in namespaces.iter().enumerate() {
        if namespaces[..i].iter().any(|m| m.prefix == n.prefix) {
            return Err(format!("prefix `{}` is declared twice", n.prefix));
        }
        if n.prefix.contains('*') {
            return Err(format!(
                "prefix `{}`: a prefix is matched as it is, without `*`",
                n.prefix
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(prefix: &str, anonymous: bool, users: bool, client_publish: Option<bool>) -> Namespace {
        Namespace {
            prefix: prefix.into(),
            anonymous,
            users,
            client_publish,
        }
    }

    fn grants(topics: &[&str], publish: &[&str]) -> Grants {
        let list = |l: &[&str]| Some(l.iter().map(|s| Box::from(*s)).collect());
        Grants {
            topics: list(topics),
            publish: list(publish),
            subscribe: None,
        }
    }

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        assert!(covers("chat:room1", "chat:room1"));
        assert!(!covers("chat:room1", "chat:room10"));
        assert!(covers("feed:*", "feed:a"));
        assert!(covers("feed:*", "feed:"));
        assert!(!covers("feed:*", "fee"));
        assert!(covers("*", "anything"));
        assert_eq!(check_patterns(&["a*".into(), "b".into()]), Ok(()));
        assert_eq!(check_patterns(&["a*b".into()]), Err("a*b"));
        assert_eq!(check_patterns(&["a**".into()]), Err("a**"));
        assert_eq!(check_patterns(&["".into()]), Err(""));
    }

    #[test]
    fn the_longest_prefix_wins_and_the_default_is_open() {
        let list = [
            ns("chat:", false, true, None),
            ns("chat:vip:", false, false, None),
        ];
        assert_eq!(namespace_of(&list, "chat:vip:1").prefix, "chat:vip:");
        assert_eq!(namespace_of(&list, "chat:1").prefix, "chat:");
        assert!(namespace_of(&list, "news").anonymous);
        let rules = Rules {
            namespaces: &list,
            client_publish: false,
        };
        // Anonymous: only outside the namespaces (the default lets anyone in).
        assert_eq!(rules.subscribe(false, None, "news"), Ok(()));
        assert_eq!(
            rules.subscribe(false, None, "chat:1"),
            Err(Refused::Forbidden)
        );
        // Identified: `chat:` is open to users, `chat:vip:` needs a grant.
        assert_eq!(rules.subscribe(true, None, "chat:1"), Ok(()));
        assert_eq!(
            rules.subscribe(true, None, "chat:vip:1"),
            Err(Refused::Forbidden)
        );
        let g = grants(&["chat:vip:1", "chat:vip:team*"], &[]);
        assert_eq!(rules.subscribe(true, Some(&g), "chat:vip:1"), Ok(()));
        assert_eq!(rules.subscribe(true, Some(&g), "chat:vip:team-a"), Ok(()));
        assert_eq!(
            rules.subscribe(true, Some(&g), "chat:vip:2"),
            Err(Refused::Forbidden)
        );
    }

    #[test]
    fn publishing_needs_a_grant_or_the_namespace() {
        let list = [
            ns("chat:", false, true, Some(true)),
            ns("ro:", true, true, Some(false)),
        ];
        let off = Rules {
            namespaces: &list,
            client_publish: false,
        };
        assert_eq!(off.publish(None, "chat:1"), Ok(()));
        assert_eq!(off.publish(None, "ro:1"), Err(Refused::Forbidden));
        assert_eq!(off.publish(None, "other"), Err(Refused::PublishOff));
        let g = grants(&[], &["ro:announce", "other*"]);
        assert_eq!(off.publish(Some(&g), "ro:announce"), Ok(()));
        assert_eq!(off.publish(Some(&g), "other:x"), Ok(()));
        // A token with a `publish` claim is told the topic is not granted.
        assert_eq!(off.publish(Some(&g), "else"), Err(Refused::Forbidden));
        let on = Rules {
            namespaces: &list,
            client_publish: true,
        };
        assert_eq!(on.publish(None, "other"), Ok(()));
        assert_eq!(on.publish(None, "ro:1"), Err(Refused::Forbidden));
    }

    #[test]
    fn a_prefix_is_declared_once() {
        assert!(validate(&[ns("a", false, true, None), ns("b", false, true, None)]).is_ok());
        assert!(validate(&[ns("a", false, true, None), ns("a", true, true, None)]).is_err());
        assert!(validate(&[ns("a*", false, true, None)]).is_err());
    }

    #[test]
    fn namespaces_read_from_toml() {
        #[derive(Deserialize)]
        struct File {
            namespace: Vec<Namespace>,
        }
        let f: File = toml::from_str(
            "[[namespace]]\nprefix = \"chat:\"\n[[namespace]]\nprefix = \"\"\nanonymous = true\nclient_publish = true\n",
        )
        .unwrap();
        assert_eq!(f.namespace[0], ns("chat:", false, true, Some(false)));
        assert_eq!(f.namespace[1], ns("", true, true, Some(true)));
        assert!(toml::from_str::<File>("[[namespace]]\nprefx = \"a\"\n").is_err());
    }
}
