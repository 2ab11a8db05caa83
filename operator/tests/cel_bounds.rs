//! The CRD's CEL rules would pass a real API server's cost estimate: every
//! list a rule iterates or reads, and every string it compares, has a
//! `maxItems`/`maxLength`, and every list above a rule is bounded too.
//!
//! kube's client-side CEL engine (what `render.rs` uses) doesn't estimate
//! cost; the API server refuses a CRD whose rules it estimates over budget
//! ("estimated rule cost exceeds budget"), sizing an unbounded list from the
//! 3 MiB request limit. This test reads each rule, finds every field path it
//! touches (`self.a.b`, `oldSelf.a`, and variables bound by `all`, `exists`,
//! `exists_one`, `map`, `filter`), and checks the schema bounds each one.

use kube::CustomResourceExt;
use presence_operator::crd::PresenceCluster;
use serde_json::Value;
use std::collections::BTreeMap;

/// Macros that bind a variable to the items of the list they are called on.
const MACROS: &[&str] = &["all", "exists", "exists_one", "map", "filter"];

/// One identifier path as written in a rule: the root, then field names;
/// `None` marks "the items of the list so far" (a macro variable).
type Path = Vec<Option<String>>;

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Dot,
    Open,
    Comma,
    Other,
}

fn tokens(rule: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = rule.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                // Skip a string literal (no escapes in our rules).
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push(Token::Other);
            }
            '.' => out.push(Token::Dot),
            '(' => out.push(Token::Open),
            ',' => out.push(Token::Comma),
            c if c.is_alphabetic() || c == '_' => {
                let mut ident = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_alphanumeric() || d == '_' {
                        ident.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Ident(ident));
            }
            c if c.is_whitespace() => {}
            _ => out.push(Token::Other),
        }
    }
    out
}

/// Every field path the rule touches, with macro variables expanded.
fn paths(rule: &str) -> Vec<Path> {
    let tokens = tokens(rule);
    let mut bound: BTreeMap<String, Path> = BTreeMap::new();
    let mut declarations = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let Token::Ident(root) = &tokens[i] else {
            i += 1;
            continue;
        };
        // An identifier right after a dot belongs to the path before it, and
        // a macro's variable declaration is not a use.
        if (i > 0 && tokens[i - 1] == Token::Dot) || declarations.contains(&i) {
            i += 1;
            continue;
        }
        let mut path: Path = match root.as_str() {
            "self" | "oldSelf" => vec![],
            other => match bound.get(other) {
                Some(p) => p.clone(),
                None => {
                    i += 1;
                    continue;
                }
            },
        };
        let mut j = i + 1;
        while j + 1 < tokens.len() && tokens[j] == Token::Dot {
            let Token::Ident(name) = &tokens[j + 1] else {
                break;
            };
            if tokens.get(j + 2) == Some(&Token::Open) {
                // A method or macro on the path so far.
                if MACROS.contains(&name.as_str())
                    && let Some(Token::Ident(var)) = tokens.get(j + 3)
                    && tokens.get(j + 4) == Some(&Token::Comma)
                {
                    let mut items = path.clone();
                    items.push(None);
                    bound.insert(var.clone(), items);
                    declarations.insert(j + 3);
                }
                break;
            }
            path.push(Some(name.clone()));
            j += 2;
        }
        out.push(path);
        i = j.max(i + 1);
    }
    out
}

/// The schema node at `path` below `node`, or `None` if the path leaves
/// the schema (a rule on `metadata`, which the API server bounds itself).
fn resolve<'a>(mut node: &'a Value, path: &Path) -> Option<Vec<&'a Value>> {
    let mut visited = vec![node];
    for step in path {
        node = match step {
            Some(field) => node.get("properties")?.get(field)?,
            None => node.get("items")?,
        };
        visited.push(node);
    }
    Some(visited)
}

fn is_bounded(node: &Value) -> Result<(), &'static str> {
    match node.get("type").and_then(Value::as_str) {
        Some("array") if node.get("maxItems").is_none() => Err("a list without maxItems"),
        Some("string")
            if node.get("maxLength").is_none()
                && node.get("enum").is_none()
                && node.get("format").is_none() =>
        {
            Err("a string without maxLength")
        }
        Some("object")
            if node.get("additionalProperties").is_some()
                && node.get("maxProperties").is_none() =>
        {
            Err("a map without maxProperties")
        }
        None if node.get("x-kubernetes-int-or-string").is_some()
            && node.get("maxLength").is_none() =>
        {
            Err("an int-or-string without maxLength")
        }
        _ => Ok(()),
    }
}

/// Every problem in the schema below `node`; `lists` are the list nodes
/// above it (a rule inside list items runs once per item).
fn check(node: &Value, at: &str, lists: &[&Value], problems: &mut Vec<String>) {
    for rule in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = rule["rule"].as_str().unwrap_or_default();
        // Each unbounded field once per rule.
        let mut reported = std::collections::BTreeSet::new();
        for list in lists {
            if list.get("maxItems").is_none() {
                problems.push(format!("{at}: rule {text:?} sits inside an unbounded list"));
            }
        }
        for path in paths(text) {
            if path.first() == Some(&Some("metadata".to_owned())) {
                continue; // the API server types and bounds metadata.name itself
            }
            let Some(nodes) = resolve(node, &path) else {
                problems.push(format!(
                    "{at}: rule {text:?} reads {path:?}, which isn't in the schema"
                ));
                continue;
            };
            for touched in nodes.iter().skip(1) {
                if let Err(why) = is_bounded(touched)
                    && reported.insert(std::ptr::from_ref(*touched))
                {
                    problems.push(format!("{at}: rule {text:?} reads {path:?} through {why}"));
                }
            }
        }
    }
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            check(child, &format!("{at}.{name}"), lists, problems);
        }
    }
    if let Some(items) = node.get("items") {
        let mut inner = lists.to_vec();
        inner.push(node);
        check(items, &format!("{at}[]"), &inner, problems);
    }
}

fn schema() -> Value {
    let crd = serde_json::to_value(PresenceCluster::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn every_rule_touches_only_bounded_fields() {
    let mut problems = Vec::new();
    check(&schema(), "", &[], &mut problems);
    assert!(
        problems.is_empty(),
        "CEL rules the API server would price out:\n{}",
        problems.join("\n")
    );
}

#[test]
fn leaves_are_a_map_keyed_by_name_without_a_quadratic_rule() {
    let leaves = &schema()["properties"]["spec"]["properties"]["leaves"];
    assert_eq!(leaves["x-kubernetes-list-type"], "map");
    assert_eq!(
        leaves["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert!(leaves.get("maxItems").is_some());
    assert!(leaves.get("x-kubernetes-validations").is_none());
}

#[test]
fn the_checker_finds_unbounded_fields() {
    // The checker itself: an unbounded list iterated by a rule, a string
    // compared without maxLength, and a rule inside an unbounded list.
    let schema = serde_json::json!({
        "type": "object",
        "x-kubernetes-validations": [{"rule": "self.xs.all(x, x.name != self.s)"}],
        "properties": {
            "xs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}}}},
            "s": {"type": "string"},
            "ys": {"type": "array", "items": {"type": "object",
                "x-kubernetes-validations": [{"rule": "self.n > 0"}],
                "properties": {"n": {"type": "integer"}}}}
        }
    });
    let mut problems = Vec::new();
    check(&schema, "", &[], &mut problems);
    let text = problems.join("\n");
    assert!(
        text.contains("xs") && text.contains("without maxItems"),
        "{text}"
    );
    assert!(
        text.contains("\"s\"") && text.contains("without maxLength"),
        "{text}"
    );
    assert!(text.contains("inside an unbounded list"), "{text}");
    assert_eq!(problems.len(), 3, "{text}");
    // Bounded, the same schema passes.
    let mut bounded = schema.clone();
    bounded["properties"]["xs"]["maxItems"] = 8.into();
    bounded["properties"]["s"]["maxLength"] = 8.into();
    bounded["properties"]["ys"]["maxItems"] = 8.into();
    problems.clear();
    check(&bounded, "", &[], &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn paths_follow_macro_variables() {
    assert_eq!(
        paths(
            "!has(self.leaves) || self.leaves.all(l, l.name != (has(self.center.name) ? self.center.name : 'center'))"
        ),
        vec![
            vec![Some("leaves".to_owned())],
            vec![Some("leaves".to_owned())],
            vec![Some("leaves".to_owned()), None, Some("name".to_owned())],
            vec![Some("center".to_owned()), Some("name".to_owned())],
            vec![Some("center".to_owned()), Some("name".to_owned())],
        ]
    );
}
