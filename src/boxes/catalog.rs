//! Vagrant catalogs (issue 20): the `metadata.json` that Vagrant Cloud and self-hosted box catalogs serve, with
//! `versions[].providers[]` (`name`, `url`, `checksum_type`, `checksum`), and Vagrant's version constraints
//! (`>= 1.2, < 2`, `~> 1.2`, `= 1.0.3`). `[box] url = ".../metadata.json"` (+ `version`) picks the newest version
//! that satisfies the constraint and has a box for the provider, then downloads it as a `url` + `sha256` box.

use std::cmp::Ordering;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Catalog {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub versions: Vec<CatalogVersion>,
}

#[derive(Debug, Deserialize)]
pub struct CatalogVersion {
    pub version: String,
    #[serde(default)]
    pub providers: Vec<CatalogProvider>,
}

#[derive(Debug, Deserialize)]
pub struct CatalogProvider {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub checksum_type: Option<String>,
    #[serde(default)]
    pub checksum: Option<String>,
}

/// The box a catalog gives for a constraint and provider.
#[derive(Debug, PartialEq, Eq)]
pub struct Pick {
    pub version: String,
    pub url: String,
    /// The sha256 to check the download against.
    pub sha256: String,
}

/// Whether a `[box] url` names a catalog rather than a box file.
pub fn is_catalog_url(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.ends_with(".json")
}

pub fn parse(text: &str) -> Result<Catalog> {
    let c: Catalog = serde_json::from_str(text).context(
        "the Vagrant catalog is not valid: expected {\"name\", \"versions\": [{\"version\", \"providers\": \
         [{\"name\", \"url\", \"checksum_type\", \"checksum\"}]}]}",
    )?;
    if c.versions.is_empty() {
        bail!("the Vagrant catalog {:?} lists no versions", c.name);
    }
    Ok(c)
}

/// A version as Vagrant compares them: dot-separated parts, numeric parts by value, others as text.
fn cmp_versions(a: &str, b: &str) -> Ordering {
    let parts = |v: &str| -> Vec<String> { v.trim().split('.').map(str::to_string).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        let x = pa.get(i).map(String::as_str).unwrap_or("0");
        let y = pb.get(i).map(String::as_str).unwrap_or("0");
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// One clause of a constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Clause {
    Op(&'static str, String),
}

/// A Vagrant version constraint: clauses separated by commas, all of which must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint(Vec<Clause>);

impl Constraint {
    pub fn parse(text: &str) -> Result<Self> {
        let mut clauses = Vec::new();
        for raw in text.split(',') {
            let c = raw.trim();
            let (op, rest) = ["~>", ">=", "<=", "!=", ">", "<", "="]
                .iter()
                .find_map(|op| c.strip_prefix(op).map(|r| (*op, r.trim())))
                .unwrap_or(("=", c));
            let ok = !rest.is_empty()
                && rest
                    .split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-'));
            if !ok {
                bail!(
                    "[box] version = {text:?}: {c:?} is not a version constraint\nhint: write it as Vagrant does, \
                     e.g. \">= 1.2, < 2\", \"~> 4.3\" or \"= 4.3.12\""
                );
            }
            if op == "~>" {
                // ~> 1.2 is >= 1.2, < 2; ~> 1.2.3 is >= 1.2.3, < 1.3.
                let mut parts: Vec<String> = rest.split('.').map(str::to_string).collect();
                clauses.push(Clause::Op(">=", rest.to_string()));
                if parts.len() > 1 {
                    parts.pop();
                }
                let last = parts.len() - 1;
                let bumped = parts[last].parse::<u64>().map(|n| n + 1).unwrap_or(u64::MAX);
                parts[last] = bumped.to_string();
                clauses.push(Clause::Op("<", parts.join(".")));
            } else {
                clauses.push(Clause::Op(op, rest.to_string()));
            }
        }
        Ok(Self(clauses))
    }

    pub fn matches(&self, version: &str) -> bool {
        self.0.iter().all(|Clause::Op(op, v)| {
            let o = cmp_versions(version, v);
            match *op {
                ">=" => o != Ordering::Less,
                "<=" => o != Ordering::Greater,
                ">" => o == Ordering::Greater,
                "<" => o == Ordering::Less,
                "!=" => o != Ordering::Equal,
                _ => o == Ordering::Equal,
            }
        })
    }
}

/// The newest version matching `constraint` (any when None) with a box for `provider`.
pub fn pick(c: &Catalog, constraint: Option<&Constraint>, provider: &str) -> Result<Pick> {
    let mut versions: Vec<&CatalogVersion> =
        c.versions.iter().filter(|v| constraint.map_or(true, |k| k.matches(&v.version))).collect();
    versions.sort_by(|a, b| cmp_versions(&b.version, &a.version));
    let all: Vec<&str> = c.versions.iter().map(|v| v.version.as_str()).collect();
    if versions.is_empty() {
        bail!(
            "no version of the box {:?} matches [box] version (the catalog has {})\nhint: loosen `version`, or \
             pick one of those",
            c.name,
            all.join(", ")
        );
    }
    for v in &versions {
        let Some(p) = v.providers.iter().find(|p| p.name == provider) else { continue };
        let kind = p.checksum_type.as_deref().unwrap_or("").to_ascii_lowercase();
        let sum = p.checksum.as_deref().unwrap_or("").trim();
        if kind != "sha256" || sum.is_empty() {
            bail!(
                "the catalog's {provider} box of {:?} version {} has checksum_type {:?}; provisioner checks every \
                 download against a sha256\nhint: ask the publisher for sha256 checksums, or download the box \
                 yourself and set [box] url to it with sha256 = \"...\"",
                c.name,
                v.version,
                p.checksum_type.as_deref().unwrap_or("none")
            );
        }
        return Ok(Pick { version: v.version.clone(), url: p.url.clone(), sha256: sum.to_string() });
    }
    bail!(
        "no matching version of the box {:?} has a {provider} box (matching: {})\nhint: use a box published for \
         {provider}, or another provider",
        c.name,
        versions.iter().map(|v| v.version.as_str()).collect::<Vec<_>>().join(", ")
    )
}

/// The catalog at `url` (http(s):// or file://).
pub fn fetch_text(url: &str) -> Result<String> {
    if let Some(path) = url.strip_prefix("file://") {
        return std::fs::read_to_string(path).with_context(|| format!("read the Vagrant catalog {url}"));
    }
    let resp = match crate::http::agent()?.timeout(std::time::Duration::from_secs(60)).build().get(url).call()
    {
        Err(e) if crate::http::is_certificate_error(&e) => {
            bail!("fetch the Vagrant catalog {url}: {e}\nhint: {}", crate::http::CERTIFICATE_HINT)
        }
        r => {
            r.with_context(|| format!("fetch the Vagrant catalog {url}\nhint: check the URL, DNS and proxy"))?
        }
    };
    resp.into_string().with_context(|| format!("read the Vagrant catalog {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"{
      "name": "acme/debian12",
      "versions": [
        {"version": "1.0.0", "providers": [
          {"name": "libvirt", "url": "https://x/1.0.0/libvirt.box", "checksum_type": "sha256", "checksum": "aa"}]},
        {"version": "1.10.0", "providers": [
          {"name": "virtualbox", "url": "https://x/1.10.0/vb.box", "checksum_type": "sha256", "checksum": "bb"},
          {"name": "libvirt", "url": "https://x/1.10.0/libvirt.box", "checksum_type": "sha256", "checksum": "cc"}]},
        {"version": "1.2.0", "providers": [
          {"name": "libvirt", "url": "https://x/1.2.0/libvirt.box", "checksum_type": "sha256", "checksum": "dd"}]},
        {"version": "2.0.0", "providers": [
          {"name": "libvirt", "url": "https://x/2.0.0/libvirt.box", "checksum_type": "sha1", "checksum": "ee"}]}
      ]}"#;

    #[test]
    fn catalogs_are_parsed_and_the_newest_matching_version_is_picked() {
        let c = parse(CATALOG).unwrap();
        assert_eq!(c.name, "acme/debian12");
        let k = Constraint::parse(">= 1.2, < 2").unwrap();
        // 1.10.0 is newer than 1.2.0 (numeric parts).
        assert_eq!(
            pick(&c, Some(&k), "libvirt").unwrap(),
            Pick {
                version: "1.10.0".into(),
                url: "https://x/1.10.0/libvirt.box".into(),
                sha256: "cc".into()
            }
        );
        assert_eq!(
            pick(&c, Some(&Constraint::parse("~> 1.0.0").unwrap()), "libvirt").unwrap().version,
            "1.0.0"
        );
        assert_eq!(pick(&c, Some(&Constraint::parse("1.2.0").unwrap()), "libvirt").unwrap().sha256, "dd");
        assert_eq!(pick(&c, Some(&k), "virtualbox").unwrap().sha256, "bb");
        // The newest (2.0.0) has only a sha1: refused, not downloaded unchecked.
        let e = format!("{:#}", pick(&c, None, "libvirt").unwrap_err());
        assert!(e.contains("checksum_type \"sha1\"") && e.contains("hint:"), "{e}");
        let e = format!("{:#}", pick(&c, Some(&Constraint::parse(">= 3").unwrap()), "libvirt").unwrap_err());
        assert!(e.contains("catalog has 1.0.0, 1.10.0, 1.2.0, 2.0.0"), "{e}");
        let e = format!("{:#}", pick(&c, Some(&Constraint::parse("< 1.1").unwrap()), "hyperv").unwrap_err());
        assert!(e.contains("has a hyperv box"), "{e}");
        assert!(parse("{\"versions\": []}").is_err());
        assert!(parse("<html>").is_err());
    }

    #[test]
    fn constraints_follow_vagrant() {
        let m = |k: &str, v: &str| Constraint::parse(k).unwrap().matches(v);
        assert!(m("~> 1.2", "1.9.9") && !m("~> 1.2", "2.0") && !m("~> 1.2", "1.1"));
        assert!(m("~> 1.2.3", "1.2.9") && !m("~> 1.2.3", "1.3.0"));
        assert!(m(">= 1.2, < 2", "1.2") && m(">= 1.2, < 2", "1.99") && !m(">= 1.2, < 2", "2.0.0"));
        assert!(m("= 1.0", "1.0.0") && m("!= 1.0", "1.0.1") && m("> 1", "1.0.1") && m("<= 2", "2"));
        for bad in ["", ">=", ">= 1..2", "1.2 or 3", "=> 1"] {
            let e = format!("{:#}", Constraint::parse(bad).unwrap_err());
            assert!(e.contains("is not a version constraint") && e.contains("hint:"), "{bad}: {e}");
        }
    }

    #[test]
    fn catalog_urls_are_told_from_box_urls() {
        assert!(is_catalog_url("https://example.org/acme/debian12/metadata.json"));
        assert!(is_catalog_url("file:///srv/boxes/metadata.json?x=1"));
        assert!(!is_catalog_url("https://example.org/debian12.box"));
    }
}
