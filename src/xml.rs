//! XML, one way each: [`escape`] for every value written into XML (libvirt domain and network XML, the restored
//! domain of a cached lab), and reading hypervisor XML (libvirt's domain XML, VirtualBox's settings file) with a
//! parser ([`parse`], roxmltree), never by searching the text.

/// `s` as XML text or as an attribute value in either quote: `& < > ' "` become entities.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The document, or `None` when `xml` is not well-formed (the callers' "no such value").
pub(crate) fn parse(xml: &str) -> Option<roxmltree::Document<'_>> {
    roxmltree::Document::parse(xml).ok()
}

/// Whether one of `values` is, whole, the text of an element (`<path>V</path>`) or the value of an attribute
/// (`<source file='V'/>`) of the document `xml`. False when `xml` is not well-formed.
pub(crate) fn mentions(xml: &str, values: &[String]) -> bool {
    let Some(doc) = parse(xml) else { return false };
    let is_one = |s: &str| values.iter().any(|v| v == s);
    doc.descendants()
        .filter(roxmltree::Node::is_element)
        .any(|n| n.attributes().any(|a| is_one(a.value())) || n.text().is_some_and(|t| is_one(t.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_finds_a_value_as_text_or_attribute_only_whole() {
        let vol = "<volume><target><path>/p/m-disk.qcow2</path></target>\
                   <backingStore><path>/p/box-ab.qcow2</path></backingStore></volume>";
        assert!(mentions(vol, &["/p/box-ab.qcow2".into()]));
        assert!(!mentions(vol, &["/p/box-a".into()]));
        let dom = "<domain><os><kernel>/p/box-ab-vmlinuz</kernel></os><disk><source file=\"/p/x\"/></disk></domain>";
        assert!(mentions(dom, &["/p/x".into()]));
        assert!(mentions(dom, &["/p/box-ab-vmlinuz".into()]));
        assert!(!mentions("<a>", &["/p/x".into()]));
    }

    #[test]
    fn escaped_values_read_back_unchanged() {
        let value = "/srv/o'brien & \"co\" <x>";
        assert_eq!(escape(value), "/srv/o&apos;brien &amp; &quot;co&quot; &lt;x&gt;");
        for xml in [format!("<a v='{}'/>", escape(value)), format!("<a v=\"{}\"/>", escape(value))] {
            assert_eq!(parse(&xml).unwrap().root_element().attribute("v"), Some(value));
        }
        let text = format!("<a>{}</a>", escape(value));
        assert_eq!(parse(&text).unwrap().root_element().text(), Some(value));
        assert!(parse("<a>").is_none());
    }
}
