//! The configuration reference (`docs/config.md`), generated from the config types: every
//! key with its default, its environment variable and its doc comment. `gateway config
//! reference` prints it; a test keeps the checked-in copy in step with the code.

use serde_json::Value;

use super::Config;

/// One documented key.
#[derive(Debug)]
struct Key {
    name: String,
    default: String,
    env: String,
    about: String,
}

/// A table of keys, under a heading.
#[derive(Debug)]
struct Section {
    heading: String,
    about: String,
    keys: Vec<Key>,
}

/// The reference as Markdown.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the configuration types by `gateway config reference`; a test fails when\n\
         this file and the code disagree. Every key can be set in the TOML file given with\n\
         `--config` and overridden by its environment variable. `gateway config check FILE`\n\
         validates a file and prints the effective configuration, secrets masked.\n",
    );
    for section in sections() {
        out.push_str(&format!("\n## {}\n\n", section.heading));
        if !section.about.is_empty() {
            out.push_str(&format!("{}\n\n", section.about));
        }
        out.push_str("| key | default | environment | |\n|---|---|---|---|\n");
        for key in section.keys {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                key.name, key.default, key.env, key.about
            ));
        }
    }
    out
}

/// Keys without a doc comment: each one should say what it is for.
pub fn undocumented() -> Vec<String> {
    sections()
        .into_iter()
        .flat_map(|s| s.keys)
        .filter(|k| k.about.is_empty())
        .map(|k| k.name)
        .collect()
}

fn sections() -> Vec<Section> {
    let schema = serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is JSON");
    let defaults = serde_json::to_value(Config::default()).expect("the defaults are JSON");
    let defs = &schema["$defs"];
    let mut top = Section {
        heading: "Top level".into(),
        about: String::new(),
        keys: Vec::new(),
    };
    let mut nested = Vec::new();
    for (name, property) in properties(&schema) {
        match referenced(property, defs) {
            Some(def) if def["type"] == "object" => {
                let mut section = Section {
                    heading: format!("[{name}]"),
                    about: text(def),
                    keys: Vec::new(),
                };
                for (key, field) in properties(def) {
                    keys(
                        &mut section.keys,
                        &format!("{name}.{key}"),
                        field,
                        &defaults[name][key],
                        defs,
                    );
                }
                nested.push(section);
            }
            _ => keys(&mut top.keys, name, property, &defaults[name], defs),
        }
    }
    std::iter::once(top).chain(nested).collect()
}

/// The row for `name`, and for an array of tables one row per field of its items.
fn keys(out: &mut Vec<Key>, name: &str, field: &Value, default: &Value, defs: &Value) {
    out.push(Key {
        name: name.to_owned(),
        default: shown(default),
        env: format!("`GATEWAY_{}`", name.to_uppercase().replace('.', "__")),
        about: text(field),
    });
    if let Some(item) = referenced(&field["items"], defs) {
        for (key, sub) in properties(item) {
            out.push(Key {
                name: format!("{name}[].{key}"),
                default: if sub["default"].is_null() && !required(item, key) {
                    "unset".into()
                } else {
                    "required".into()
                },
                env: "(in the file)".into(),
                about: text(sub),
            });
        }
    }
}

fn properties(schema: &Value) -> Vec<(&str, &Value)> {
    schema["properties"]
        .as_object()
        .map(|p| p.iter().map(|(k, v)| (k.as_str(), v)).collect())
        .unwrap_or_default()
}

fn required(schema: &Value, key: &str) -> bool {
    schema["required"]
        .as_array()
        .is_some_and(|r| r.iter().any(|k| k == key))
}

/// The definition a `$ref` points at.
fn referenced<'a>(schema: &'a Value, defs: &'a Value) -> Option<&'a Value> {
    let name = schema["$ref"].as_str()?.strip_prefix("#/$defs/")?;
    Some(&defs[name])
}

/// A doc comment as one table cell.
fn text(schema: &Value) -> String {
    schema["description"]
        .as_str()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn shown(default: &Value) -> String {
    match default {
        Value::Null => "unset".into(),
        Value::Array(items) if items.is_empty() => "`[]`".into(),
        other => format!("`{other}`"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_key_says_what_it_is_for() {
        assert_eq!(super::undocumented(), Vec::<String>::new());
    }

    #[test]
    fn the_checked_in_reference_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == super::markdown(),
            "docs/config.md is out of date: run `target/release/gateway config reference > docs/config.md`"
        );
    }
}
