//! The counts the docs quote from the code: a page that says how many drain sources, host calls
//! or bench configurations there are says what the code has. Each check reads the sentence the
//! page states it in, so a rewording that drops the count fails here too.

use std::fs;
use std::path::Path;

fn page(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The count a page gives just before `phrase` (a word, or digits).
fn count_before(text: &str, phrase: &str) -> usize {
    let at = text.find(phrase).unwrap_or_else(|| panic!("no {phrase:?} on the page"));
    let word = text[..at].split_whitespace().last().unwrap_or_default().trim_matches(|c: char| !c.is_alphanumeric());
    const WORDS: [&str; 13] =
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];
    WORDS
        .iter()
        .position(|w| w.eq_ignore_ascii_case(word))
        .or_else(|| word.parse().ok())
        .unwrap_or_else(|| panic!("{word:?} before {phrase:?} is not a count"))
}

/// The paragraph (up to a blank line) from `phrase` on.
fn paragraph_from<'a>(text: &'a str, phrase: &str) -> &'a str {
    let at = text.find(phrase).unwrap_or(0);
    let rest = &text[at..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

#[test]
fn architecture_names_every_drain_source() {
    let text = page("architecture.md");
    let phrase = "sources (`drain::Source::ALL`)";
    assert_eq!(count_before(&text, phrase), close_relay::drain::Source::ALL.len());
    let section = paragraph_from(&text, phrase);
    for source in close_relay::drain::Source::ALL {
        assert!(section.contains(&format!("`{}`", source.as_str())), "{} is not named", source.as_str());
    }
}

#[test]
fn hardening_counts_every_host_call() {
    let text = page("hardening.md");
    assert_eq!(count_before(&text, "host calls in turn"), close_relay::host::Call::ALL.len());
}

#[test]
fn cost_counts_the_configurations_it_lists() {
    let text = page("cost.md");
    let phrase = "configurations side by side";
    let said = count_before(&text, phrase);
    // The list that follows the sentence: its top-level items, up to the blank line.
    let items = paragraph_from(&text, phrase).lines().filter(|l| l.starts_with("- ")).count();
    assert_eq!(said, items, "the page says {said} configurations and lists {items}");
}
