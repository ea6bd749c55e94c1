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

#[cfg(test)]
mod tests {
    use super::*;

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
