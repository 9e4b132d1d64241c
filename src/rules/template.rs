//! Templates in alert texts and compensation payloads: `{{key}}`, `{{rule}}`, `{{step}}`,
//! `{{within}}`, `{{deadline}}` and `{{trigger.PATH}}`, parsed once at load time.

/// A parsed template string.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Lit(String),
    Key,
    Rule,
    Step,
    Within,
    Deadline,
    /// A field of the trigger event: index into the rule's captured trigger paths.
    Trigger(usize),
}

/// The values a template is rendered with.
pub struct Vars<'a> {
    pub key: &'a str,
    pub rule: &'a str,
    pub step: &'a str,
    pub within: &'a str,
    pub deadline: &'a str,
    pub captures: &'a [String],
}

impl Template {
    /// Parses `text`; `capture` maps a `trigger.PATH` to its capture index (or an error).
    /// Every bad placeholder is reported, not only the first.
    pub fn parse(
        text: &str,
        mut capture: impl FnMut(&str) -> Result<usize, String>,
    ) -> Result<Template, Vec<String>> {
        let mut parts = Vec::new();
        let mut errors = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                errors.push(format!("unclosed \"{{{{\" in template {text:?}"));
                rest = "";
                break;
            };
            let name = after[..close].trim();
            rest = &after[close + 2..];
            parts.push(match name {
                "key" => Part::Key,
                "rule" => Part::Rule,
                "step" => Part::Step,
                "within" => Part::Within,
                "deadline" => Part::Deadline,
                _ => match name.strip_prefix("trigger.") {
                    Some(path) => match capture(path) {
                        Ok(i) => Part::Trigger(i),
                        Err(e) => {
                            errors.push(format!("template placeholder \"{{{{{name}}}}}\": {e}"));
                            continue;
                        }
                    },
                    None => {
                        errors.push(format!(
                            "unknown template placeholder \"{{{{{name}}}}}\"{} (known: key, rule, step, within, deadline, trigger.PATH)",
                            crate::yaml::did_you_mean(
                                name,
                                ["key", "rule", "step", "within", "deadline"]
                            )
                        ));
                        continue;
                    }
                },
            });
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if errors.is_empty() {
            Ok(Template { parts })
        } else {
            Err(errors)
        }
    }

    pub fn render(&self, v: &Vars<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Key => out.push_str(v.key),
                Part::Rule => out.push_str(v.rule),
                Part::Step => out.push_str(v.step),
                Part::Within => out.push_str(v.within),
                Part::Deadline => out.push_str(v.deadline),
                Part::Trigger(i) => out.push_str(v.captures.get(*i).map_or("", |s| s.as_str())),
            }
        }
        out
    }
}

/// A JSON payload whose strings are templates.
#[derive(Clone, Debug, PartialEq)]
pub enum PayloadTemplate {
    Str(Template),
    Other(serde_json::Value),
    Array(Vec<PayloadTemplate>),
    Object(Vec<(String, PayloadTemplate)>),
}

impl PayloadTemplate {
    /// Parses every string in `value`; errors come back with the JSON path below the
    /// payload where they occurred (`["a", "0"]`).
    pub fn parse(
        value: &serde_json::Value,
        capture: &mut impl FnMut(&str) -> Result<usize, String>,
        errors: &mut Vec<(Vec<String>, String)>,
        at: &mut Vec<String>,
    ) -> PayloadTemplate {
        match value {
            serde_json::Value::String(s) => match Template::parse(s, &mut *capture) {
                Ok(t) => PayloadTemplate::Str(t),
                Err(es) => {
                    errors.extend(es.into_iter().map(|e| (at.clone(), e)));
                    PayloadTemplate::Other(value.clone())
                }
            },
            serde_json::Value::Array(items) => PayloadTemplate::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        at.push(i.to_string());
                        let t = PayloadTemplate::parse(v, capture, errors, at);
                        at.pop();
                        t
                    })
                    .collect(),
            ),
            serde_json::Value::Object(map) => PayloadTemplate::Object(
                map.iter()
                    .map(|(k, v)| {
                        at.push(k.clone());
                        let t = PayloadTemplate::parse(v, capture, errors, at);
                        at.pop();
                        (k.clone(), t)
                    })
                    .collect(),
            ),
            other => PayloadTemplate::Other(other.clone()),
        }
    }

    pub fn render(&self, v: &Vars<'_>) -> serde_json::Value {
        match self {
            PayloadTemplate::Str(t) => serde_json::Value::String(t.render(v)),
            PayloadTemplate::Other(x) => x.clone(),
            PayloadTemplate::Array(items) => items.iter().map(|t| t.render(v)).collect(),
            PayloadTemplate::Object(fields) => fields
                .iter()
                .map(|(k, t)| (k.clone(), t.render(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_capture(_: &str) -> Result<usize, String> {
        Ok(0)
    }

    #[test]
    fn renders_placeholders() {
        let t = Template::parse(
            "order {{key}}: {{ step }} missing after {{within}} ({{trigger.a.b}})",
            no_capture,
        )
        .unwrap();
        let caps = vec!["X".to_string()];
        let v = Vars {
            key: "o1",
            rule: "r",
            step: "payment",
            within: "15m",
            deadline: "D",
            captures: &caps,
        };
        assert_eq!(t.render(&v), "order o1: payment missing after 15m (X)");
    }

    #[test]
    fn rejects_unknown_and_unclosed() {
        let e = Template::parse("{{kye}}", no_capture).unwrap_err();
        assert!(e[0].contains("did you mean \"key\""), "{e:?}");
        assert!(Template::parse("{{key", no_capture).is_err());
        // Every bad placeholder, the unclosed one last.
        let e = Template::parse("{{kye}} {{key}} {{foo}} {{trigger.}} {{step", |p: &str| {
            if p.is_empty() {
                Err("empty dot path".to_string())
            } else {
                Ok(0)
            }
        })
        .unwrap_err();
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[1].starts_with("unknown template placeholder \"{{foo}}\""),
            "{e:?}"
        );
        assert_eq!(
            e[2],
            "template placeholder \"{{trigger.}}\": empty dot path"
        );
        assert!(e[3].starts_with("unclosed"), "{e:?}");
    }
}
