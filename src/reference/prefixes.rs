//! The plate-prefix table: `prefix,province,city`, e.g. `赣A,江西,南昌`.

use super::ReferenceError;
use rustc_hash::FxHashMap;
use std::path::Path;
use std::sync::Arc;

/// The complete table for mainland China that ships with passflow.
const SHIPPED: &str = include_str!("../../config/plate_prefixes.csv");

/// Where a plate was issued.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub province: Arc<str>,
    pub city: Arc<str>,
}

/// A vehicle's origin relative to the city: the city itself, another city of its province, or
/// another province (see `crate::pipelines::plate_origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OriginScope {
    Local,
    Province,
    Other,
}

impl OriginScope {
    pub fn as_str(self) -> &'static str {
        match self {
            OriginScope::Local => "local",
            OriginScope::Province => "province",
            OriginScope::Other => "other",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PrefixTable {
    by_prefix: FxHashMap<Arc<str>, Origin>,
}

impl PrefixTable {
    /// The table passflow ships (`config/plate_prefixes.csv`).
    pub fn shipped() -> PrefixTable {
        // The shipped table is checked by the tests below; it always parses.
        PrefixTable::parse(SHIPPED, Path::new("config/plate_prefixes.csv")).expect("shipped plate prefix table parses")
    }

    pub fn read(file: &Path) -> Result<PrefixTable, ReferenceError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ReferenceError::File { file: file.to_owned(), message: e.to_string() })?;
        PrefixTable::parse(&text, file)
    }

    /// Parses the table; `file` only names the source in errors.
    pub fn parse(text: &str, file: &Path) -> Result<PrefixTable, ReferenceError> {
        let error = |line: usize, message: String| ReferenceError::Line {
            file: file.to_owned(),
            line: line as u64 + 1,
            message,
        };
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, header)) if header.trim().trim_start_matches('\u{feff}') == "prefix,province,city" => {}
            _ => return Err(error(0, "header must be `prefix,province,city`".into())),
        }
        let mut by_prefix = FxHashMap::default();
        for (i, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [prefix, province, city] = fields[..] else {
                return Err(error(i, format!("expected 3 fields, found {}", fields.len())));
            };
            if prefix.chars().count() != 2 || province.is_empty() || city.is_empty() {
                return Err(error(
                    i,
                    format!("`{line}`: prefix must be a province character and a letter, province and city non-empty"),
                ));
            }
            let origin = Origin { province: province.into(), city: city.into() };
            if by_prefix.insert(Arc::<str>::from(prefix), origin).is_some() {
                return Err(error(i, format!("duplicate prefix `{prefix}`")));
            }
        }
        Ok(PrefixTable { by_prefix })
    }

    pub fn origin(&self, prefix: &str) -> Option<&Origin> {
        self.by_prefix.get(prefix)
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Every prefix of one province, sorted.
    pub fn prefixes_of(&self, province: &str) -> Vec<&str> {
        let mut out: Vec<&str> =
            self.by_prefix.iter().filter(|(_, o)| &*o.province == province).map(|(p, _)| &**p).collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PROVINCES;

    #[test]
    fn the_shipped_table_covers_all_31_provinces_each_from_letter_a() {
        let table = PrefixTable::shipped();
        for p in PROVINCES {
            let a = format!("{p}A");
            assert!(table.origin(&a).is_some(), "{a} missing");
            let letters = table.by_prefix.keys().filter(|k| k.starts_with(p)).count();
            assert!(letters >= 5, "{p} has only {letters} letters");
        }
        assert!(table.len() > 350, "{}", table.len());
    }

    #[test]
    fn the_shipped_table_knows_cities_with_several_letters() {
        let table = PrefixTable::shipped();
        let city = |p: &str| table.origin(p).map(|o| (&*o.province, &*o.city));
        assert_eq!(city("赣A"), Some(("江西", "南昌")));
        assert_eq!(city("赣M"), Some(("江西", "南昌")));
        assert_eq!(city("粤E"), Some(("广东", "佛山")));
        assert_eq!(city("粤X"), Some(("广东", "佛山")));
        assert_eq!(city("粤Y"), Some(("广东", "佛山")));
        assert_eq!(city("鲁U"), Some(("山东", "青岛")));
        assert_eq!(city("川G"), Some(("四川", "成都")));
        assert_eq!(city("鲁S"), Some(("山东", "济南")));
        assert_eq!(city("京A"), Some(("北京", "北京")));
        assert_eq!(city("粤B"), Some(("广东", "深圳")));
    }

    #[test]
    fn no_prefix_uses_the_letters_i_or_o() {
        let table = PrefixTable::shipped();
        assert!(table.by_prefix.keys().all(|k| !k.ends_with('I') && !k.ends_with('O')));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let err =
            PrefixTable::parse("prefix,province,city\n赣A,江西,南昌\n赣B,江西\n", Path::new("p.csv")).unwrap_err();
        assert_eq!(err.to_string(), "p.csv:3: expected 3 fields, found 2");
        let dup =
            PrefixTable::parse("prefix,province,city\n赣A,江西,南昌\n赣A,江西,南昌\n", Path::new("p.csv")).unwrap_err();
        assert!(dup.to_string().starts_with("p.csv:3: duplicate prefix"), "{dup}");
    }
}
