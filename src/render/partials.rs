//! Partials are checked before a template renders. Handlebars 6 stops only a template that includes itself by
//! its own registered name (`CannotIncludeSelf`, checked against the current template); an inline partial that
//! includes itself (`{{#*inline "p"}}{{> p}}{{/inline}}`), or partials that include each other, recurse until the
//! stack overflows and the process aborts. So each template's partial graph is walked statically first: partial
//! names must be literal, no partial may include itself directly or through others, and nesting stops at
//! [`MAX_DEPTH`]. The error names the chain.

use std::collections::HashMap;

use handlebars::template::{Parameter, Template, TemplateElement};

/// Partials nested deeper than this are refused (far more than a provision tree needs, far less than the stack).
pub(super) const MAX_DEPTH: usize = 16;

/// A template may expand partials at most this many times, counting each inclusion inside included partials
/// (the lab's largest template expands 4). Partials that each include the next several times multiply: 12 levels
/// of 5 inclusions expand 5^11 times, hundreds of megabytes, so they are refused before rendering (and before this
/// walk itself would take that long).
pub(super) const MAX_EXPANSIONS: usize = 10_000;

/// Blocks (`{{#...}}`) nested deeper than this are refused before handlebars parses them: its parser and
/// renderer recurse once per level, and some thousands of levels overflow the stack.
pub(super) const MAX_BLOCK_DEPTH: usize = 64;

/// Refuse blocks nested deeper than [`MAX_BLOCK_DEPTH`], by a scan of the text (no recursion); `Err` holds the
/// line where the limit was passed. Escaped `\{{` does not count.
pub(super) fn check_nesting(text: &str) -> Result<(), (usize, String)> {
    let b = text.as_bytes();
    let (mut depth, mut line, mut i) = (0usize, 1usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'{' if b[i..].starts_with(b"{{") && (i == 0 || b[i - 1] != b'\\') => {
                let mut j = i + 2;
                while j < b.len() && (b[j] == b'{' || b[j] == b'~' || b[j] == b' ') {
                    j += 1;
                }
                match b.get(j) {
                    Some(b'#') => {
                        depth += 1;
                        if depth > MAX_BLOCK_DEPTH {
                            return Err((
                                line,
                                format!("blocks are nested more than {MAX_BLOCK_DEPTH} deep"),
                            ));
                        }
                    }
                    Some(b'/') => depth = depth.saturating_sub(1),
                    _ => {}
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Inline partial definitions (`{{#*inline "name"}}`) anywhere in a template, by name.
fn inlines(t: &Template) -> HashMap<String, &Template> {
    let mut out = HashMap::new();
    walk(t, &mut |e| {
        if let TemplateElement::DecoratorBlock(d) | TemplateElement::DecoratorExpression(d) = e {
            if d.name.as_name() == Some("inline") {
                if let (Some(Parameter::Literal(serde_json::Value::String(n))), Some(body)) =
                    (d.params.first(), d.template.as_ref())
                {
                    out.insert(n.clone(), body);
                }
            }
        }
    });
    out
}

/// Every element of a template, depth first, including those of inline partial bodies and blocks.
fn walk<'t>(t: &'t Template, f: &mut dyn FnMut(&'t TemplateElement)) {
    for e in &t.elements {
        f(e);
        match e {
            TemplateElement::HtmlExpression(h)
            | TemplateElement::Expression(h)
            | TemplateElement::HelperBlock(h) => {
                for sub in [&h.template, &h.inverse].into_iter().flatten() {
                    walk(sub, f);
                }
            }
            TemplateElement::DecoratorExpression(d)
            | TemplateElement::DecoratorBlock(d)
            | TemplateElement::PartialExpression(d)
            | TemplateElement::PartialBlock(d) => {
                if let Some(sub) = &d.template {
                    walk(sub, f);
                }
            }
            _ => {}
        }
    }
}

/// Partial names `t` includes itself (not inside its inline definitions, which are partials of their own).
/// `Err` for a name computed at render time.
fn uses(t: &Template) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for e in &t.elements {
        match e {
            TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d) => {
                let name =
                    match &d.name {
                        Parameter::Literal(serde_json::Value::String(s)) => s.clone(),
                        Parameter::Literal(v) => v.to_string(),
                        Parameter::Subexpression(_) => return Err(
                            "a partial name computed at render time (`{{> (...)}}`) cannot be checked for \
                                    recursion; write the partial's name literally"
                                .into(),
                        ),
                        _ => d.name.as_name().unwrap_or_default().to_string(),
                    };
                if name != "@partial-block" {
                    out.push(name);
                }
                if let Some(sub) = &d.template {
                    out.extend(uses(sub)?);
                }
            }
            TemplateElement::DecoratorBlock(d) | TemplateElement::DecoratorExpression(d)
                if d.name.as_name() != Some("inline") =>
            {
                if let Some(sub) = &d.template {
                    out.extend(uses(sub)?);
                }
            }
            TemplateElement::HtmlExpression(h)
            | TemplateElement::Expression(h)
            | TemplateElement::HelperBlock(h) => {
                for sub in [&h.template, &h.inverse].into_iter().flatten() {
                    out.extend(uses(sub)?);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Check the template registered as `name` against the templates registered before it (which handlebars would
/// also resolve as partials). `Err` says what is wrong and names the chain of partials.
pub(super) fn check(name: &str, t: &Template, registered: &HashMap<String, Template>) -> Result<(), String> {
    let root_inlines = inlines(t);
    let mut chain = vec![name.to_string()];
    let mut budget = MAX_EXPANSIONS;
    visit(t, &root_inlines, &root_inlines, registered, &mut chain, &mut budget)
}

fn visit(
    t: &Template,
    own: &HashMap<String, &Template>,
    root: &HashMap<String, &Template>,
    registered: &HashMap<String, Template>,
    chain: &mut Vec<String>,
    budget: &mut usize,
) -> Result<(), String> {
    for used in uses(t)? {
        let shown_chain = |last: &str| {
            let mut names: Vec<String> = chain.iter().map(|n| crate::text::shown(n)).collect();
            names.push(crate::text::shown(last));
            names.join(" → ")
        };
        // The template itself is chain[0]; a partial is a cycle when it is already open.
        if chain.contains(&used) {
            return Err(format!(
                "partial \"{}\" includes itself ({}); handlebars would recurse until the stack overflows",
                crate::text::shown(&used),
                shown_chain(&used)
            ));
        }
        if chain.len() > MAX_DEPTH {
            return Err(format!(
                "partials are nested more than {MAX_DEPTH} deep ({}); flatten them",
                shown_chain(&used)
            ));
        }
        let (body, next_own) = if let Some(b) = own.get(&used).or_else(|| root.get(&used)) {
            (*b, None)
        } else if let Some(file) = registered.get(&used) {
            (file, Some(inlines(file)))
        } else {
            // Not found: handlebars reports it when rendering ("Partial not found").
            continue;
        };
        if *budget == 0 {
            return Err(format!(
                "partials expand more than {MAX_EXPANSIONS} times (the last counted: {}); partials that include \
                 others several times multiply, and the output with them\nhint: include partials fewer times (or \
                 write the repeated text out); the limit is fixed",
                shown_chain(&used)
            ));
        }
        *budget -= 1;
        chain.push(used);
        visit(body, next_own.as_ref().unwrap_or(own), root, registered, chain, budget)?;
        chain.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_src(src: &str) -> Result<(), String> {
        check("t.hbs", &Template::compile(src).unwrap(), &HashMap::new())
    }

    #[test]
    fn recursion_is_refused_with_its_chain() {
        let e = check_src(r#"{{#*inline "p"}}x{{> p}}{{/inline}}{{> p}}"#).unwrap_err();
        assert!(e.contains("t.hbs → p → p"), "{e}");
        let e = check_src(
            r#"{{#*inline "a"}}{{#if x}}{{> b}}{{/if}}{{/inline}}{{#*inline "b"}}{{> a}}{{/inline}}{{> a}}"#,
        )
        .unwrap_err();
        assert!(e.contains("t.hbs → a → b → a"), "{e}");
        assert!(check_src("{{> (foo bar)}}").unwrap_err().contains("computed at render time"));
    }

    #[test]
    fn plain_partials_and_missing_ones_pass() {
        assert_eq!(
            check_src(r#"{{#*inline "a"}}A{{/inline}}{{#*inline "b"}}{{> a}}{{> a}}{{/inline}}{{> b}}"#),
            Ok(())
        );
        assert_eq!(check_src("{{> nowhere}}"), Ok(()));
    }

    #[test]
    fn deep_blocks_are_refused_before_parsing() {
        let deep = |n: usize| format!("{}x{}", "{{#if a}}".repeat(n), "{{/if}}".repeat(n));
        assert_eq!(check_nesting(&deep(MAX_BLOCK_DEPTH)), Ok(()));
        assert_eq!(check_nesting(&format!("{}\n{}", deep(MAX_BLOCK_DEPTH), deep(3))), Ok(()));
        assert_eq!(check_nesting(&format!("\n{}", deep(MAX_BLOCK_DEPTH + 1))).unwrap_err().0, 2);
        assert_eq!(check_nesting(&"\\{{#x}}".repeat(1000)), Ok(()));
    }

    #[test]
    fn expansions_are_counted_with_their_multiplicity() {
        // p1 includes p0 ten times, p2 includes p1 ten times...: p4 expands 10 + 100 + 1000 + 10000 times.
        let nest = |levels: usize| {
            let mut src = String::from("{{#*inline \"p0\"}}x{{/inline}}");
            for i in 1..=levels {
                src.push_str(&format!(
                    "{{{{#*inline \"p{i}\"}}}}{}{{{{/inline}}}}",
                    format!("{{{{> p{}}}}}", i - 1).repeat(10)
                ));
            }
            src + &format!("{{{{> p{levels}}}}}")
        };
        assert_eq!(check_src(&nest(3)), Ok(()));
        let e = check_src(&nest(12)).unwrap_err();
        assert!(e.starts_with("partials expand more than 10000 times"), "{e}");
        assert!(e.contains("t.hbs → p12 → p11"), "{e}");
    }

    #[test]
    fn depth_is_limited() {
        let mut src = String::new();
        for i in 0..=MAX_DEPTH + 1 {
            src.push_str(&format!("{{{{#*inline \"p{i}\"}}}}{{{{> p{}}}}}{{{{/inline}}}}", i + 1));
        }
        src.push_str("{{> p0}}");
        assert!(check_src(&src).unwrap_err().contains("nested more than"));
    }
}
