//! The option table's machinery: [`options!`] turns one declaration per option (name,
//! type, default, doc, whether a reload takes it) into the [`Config`](super::Config)
//! struct, its `Default`, the [`OPTIONS`](super::OPTIONS) list that the command line,
//! the reload and the README check are made from, and the setter that applies a
//! command-line or environment value. [`OptionValue`] says how each type of option is
//! read from a flag and shown as a default.

use std::net::SocketAddr;
use std::path::PathBuf;

/// One option, as the command line, `--help`, the reload and the README check see it.
#[derive(Debug, Clone, Copy)]
pub struct OptionInfo {
    /// The TOML key; `--<name with dashes>` and `RINGWAY_<NAME>` on the command line.
    pub name: &'static str,
    /// The doc comment, one line per `///` line.
    pub doc: &'static str,
    /// A SIGHUP puts a new value in force (otherwise it needs a restart).
    pub reload: bool,
    /// The value is a credential: `--help` does not show it from the environment.
    pub secret: bool,
    /// Set in the config file only (no flag, no environment variable).
    pub file: bool,
    /// How the default reads when its value would say nothing (`none`, `any`, …).
    pub shown: Option<&'static str>,
    /// How the command line takes it.
    pub shape: Shape,
    /// The values it accepts, for a choice.
    pub choices: &'static [&'static str],
}

impl OptionInfo {
    pub const fn new(
        name: &'static str,
        doc: &'static str,
        shape: Shape,
        choices: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            doc,
            reload: false,
            secret: false,
            file: false,
            shown: None,
            shape,
            choices,
        }
    }

    /// `--name-with-dashes`, without the dashes in front.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// `RINGWAY_NAME`.
    pub fn env(&self) -> String {
        format!("RINGWAY_{}", self.name.to_ascii_uppercase())
    }

    /// The doc comment as one paragraph.
    pub fn help(&self) -> String {
        self.doc
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How an option is given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `--name VALUE`.
    One,
    /// `--name` alone means true; `--name=false` or `--name false` also work.
    Switch,
    /// `--name a,b,c` (or the flag repeated); comma-separated in the environment.
    List,
}

/// A type an option can have.
pub trait OptionValue: Sized {
    const SHAPE: Shape = Shape::One;
    const CHOICES: &'static [&'static str] = &[];
    /// The value of a flag or environment variable (several for a list).
    fn from_args(values: &[String]) -> Result<Self, String>;
    /// The value as `--help` and the README show a default; `None` when unset.
    fn show(&self) -> Option<String>;
}

pub fn one(values: &[String]) -> Result<&str, String> {
    match values {
        [v] => Ok(v),
        _ => Err(format!("takes one value, got {}", values.len())),
    }
}

macro_rules! parsed {
    ($($t:ty => $what:literal),* $(,)?) => {$(
        impl OptionValue for $t {
            fn from_args(values: &[String]) -> Result<Self, String> {
                let v = one(values)?;
                v.parse().map_err(|_| format!("`{v}` is not {}", $what))
            }
            fn show(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}

parsed!(
    usize => "a whole number",
    u64 => "a whole number",
    u32 => "a whole number",
    SocketAddr => "an address (host:port, e.g. 127.0.0.1:8080)",
    String => "text",
);

impl OptionValue for bool {
    const SHAPE: Shape = Shape::Switch;
    fn from_args(values: &[String]) -> Result<Self, String> {
        match one(values)? {
            "true" => Ok(true),
            "false" => Ok(false),
            v => Err(format!("`{v}` is not true or false")),
        }
    }
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl OptionValue for PathBuf {
    fn from_args(values: &[String]) -> Result<Self, String> {
        Ok(PathBuf::from(one(values)?))
    }
    fn show(&self) -> Option<String> {
        Some(self.display().to_string())
    }
}

impl<T: OptionValue> OptionValue for Option<T> {
    const SHAPE: Shape = T::SHAPE;
    const CHOICES: &'static [&'static str] = T::CHOICES;
    fn from_args(values: &[String]) -> Result<Self, String> {
        T::from_args(values).map(Some)
    }
    fn show(&self) -> Option<String> {
        self.as_ref().and_then(T::show)
    }
}

impl OptionValue for Vec<String> {
    const SHAPE: Shape = Shape::List;
    fn from_args(values: &[String]) -> Result<Self, String> {
        Ok(values.iter().filter(|v| !v.is_empty()).cloned().collect())
    }
    fn show(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.join(","))
    }
}

impl OptionValue for Vec<crate::permissions::Namespace> {
    fn from_args(_: &[String]) -> Result<Self, String> {
        Err("is set in the config file only ([[namespace]] sections)".into())
    }
    fn show(&self) -> Option<String> {
        None
    }
}

impl OptionValue for Vec<ipnet::IpNet> {
    const SHAPE: Shape = Shape::List;
    fn from_args(values: &[String]) -> Result<Self, String> {
        values
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("`{v}` is not a network in CIDR form (10.0.0.0/8)"))
            })
            .collect()
    }
    fn show(&self) -> Option<String> {
        let shown: Vec<String> = self.iter().map(ToString::to_string).collect();
        (!shown.is_empty()).then(|| shown.join(","))
    }
}

/// A choice among names, read the way the config file reads it (serde), so a flag,
/// the environment and the file accept the same names.
macro_rules! choice {
    ($($t:ty => [$($name:literal),+]),* $(,)?) => {$(
        impl $crate::config::table::OptionValue for $t {
            const CHOICES: &'static [&'static str] = &[$($name),+];
            fn from_args(values: &[String]) -> Result<Self, String> {
                let v = $crate::config::table::one(values)?;
                <$t as serde::Deserialize>::deserialize(
                    serde::de::IntoDeserializer::into_deserializer(v),
                )
                .map_err(|_: serde::de::value::Error| {
                    format!("`{v}` is not one of {}", Self::CHOICES.join(", "))
                })
            }
            fn show(&self) -> Option<String> {
                Self::CHOICES
                    .iter()
                    .find(|c| Self::from_args(&[c.to_string()]).ok().as_ref() == Some(self))
                    .map(|c| c.to_string())
            }
        }
    )*};
}
pub(crate) use choice;

/// Declares every option once; see the module comment. Each entry:
///
/// ```text
/// /// Doc comment: the reference text of the option.
/// name: Type = default [=> "shown"] [, live] [, secret] [, file];
/// ```
///
/// `shown`: the default as `--help` and the README say it, where the value itself
/// would say nothing; `live`: a reload takes a new value; `secret`: a credential;
/// `file`: set in the config file only.
macro_rules! options {
    ($(
        $(#[doc = $doc:literal])+
        $name:ident : $ty:ty = $default:expr $(=> $shown:literal)? $(, $flag:ident)*;
    )+) => {
        /// Every option, with its default. Declared once, in the option table.
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $doc])+ pub $name: $ty, )+
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )+ }
            }
        }

        /// Every option, in the order of the table.
        pub const OPTIONS: &[$crate::config::table::OptionInfo] = &[$({
            #[allow(unused_mut)]
            let mut o = $crate::config::table::OptionInfo::new(
                stringify!($name),
                concat!($($doc, "\n"),+),
                <$ty as $crate::config::table::OptionValue>::SHAPE,
                <$ty as $crate::config::table::OptionValue>::CHOICES,
            );
            $( $crate::config::table::flag!(o, $flag); )*
            $( o.shown = Some($shown); )?
            o
        },)+];

        impl Config {
            /// Sets option `name` from a flag or environment variable's value(s).
            pub fn set(&mut self, name: &str, values: &[String]) -> Result<(), ConfigError> {
                match name {
                    $( stringify!($name) => {
                        self.$name = <$ty as $crate::config::table::OptionValue>::from_args(values)
                            .map_err(|message| ConfigError::Invalid {
                                option: stringify!($name),
                                message,
                            })?;
                    } )+
                    _ => return Err(ConfigError::Invalid {
                        option: "config",
                        message: format!("no option `{name}`"),
                    }),
                }
                Ok(())
            }

            /// The default of option `name` as `--help` and the README show it: its
            /// value, or (`false`) the entry's words for it, or `none` when unset.
            pub fn shown_default(name: &str) -> Option<(String, bool)> {
                let d = Self::default();
                let info = OPTIONS.iter().find(|o| o.name == name)?;
                if let Some(s) = info.shown {
                    return Some((s.to_string(), false));
                }
                let value = match name {
                    $( stringify!($name) =>
                        <$ty as $crate::config::table::OptionValue>::show(&d.$name), )+
                    _ => None,
                };
                Some(value.map_or_else(|| ("none".to_string(), false), |v| (v, true)))
            }

            /// `self` with the options that a reload takes (`live` in the table) from
            /// `new`; the others that differ are listed as needing a restart.
            pub fn reloaded(&self, new: &Config) -> (Config, Reload) {
                let mut merged = self.clone();
                let mut r = Reload::default();
                $( if self.$name != new.$name {
                    if OPTIONS.iter().any(|o| o.name == stringify!($name) && o.reload) {
                        merged.$name = new.$name.clone();
                        r.changed.push(stringify!($name));
                    } else {
                        r.need_restart.push(stringify!($name));
                    }
                } )+
                (merged, r)
            }
        }
    };
}
pub(crate) use options;

/// One flag of an entry in [`options!`].
macro_rules! flag {
    ($o:ident, live) => {
        $o.reload = true
    };
    ($o:ident, secret) => {
        $o.secret = true
    };
    ($o:ident, file) => {
        $o.file = true
    };
}
pub(crate) use flag;
