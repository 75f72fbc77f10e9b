//! Plain-text tables: left-aligned text columns, right-aligned number columns. Cells are escaped
//! ([`console::escape`]) and a cell wider than [`MAX_CELL`] characters is truncated in the middle with an
//! ellipsis (`…`), keeping its start and end (a tensor name's layer and suffix); rendering never panics on
//! long text.

use crate::console;

/// Widest cell, in characters, after escaping; wider ones are shortened to this width around `…`.
pub const MAX_CELL: usize = 160;

/// `cell` escaped and, when wider than [`MAX_CELL`] characters, its first and last characters around `…`.
fn fit(cell: &str) -> String {
    let e = console::escape(cell);
    let n = e.chars().count();
    if n <= MAX_CELL {
        return e;
    }
    let head = (MAX_CELL - 1) / 2;
    let tail = MAX_CELL - 1 - head;
    let mut s: String = e.chars().take(head).collect();
    s.push('…');
    s.extend(e.chars().skip(n - tail));
    s
}

/// How a column is aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table with a header row; widths are computed when rendered.
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers and alignments.
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table { columns: columns.iter().map(|(h, a)| (h.to_string(), *a)).collect(), rows: Vec::new() }
    }

    /// Adds a row (missing cells are blank, extra cells are ignored).
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row.iter().map(|c| fit(c)).collect());
    }

    /// Renders the header, a rule and every row, each line ending in `\n`.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .chain([self.columns[i].0.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut s = String::new();
            for (i, (w, (_, align))) in widths.iter().zip(&self.columns).enumerate() {
                let c = cells.next().unwrap_or("");
                if i > 0 {
                    s.push_str("  ");
                }
                // Padded by hand: `format!("{c:<w$}")` panics for widths above u16::MAX.
                let pad = " ".repeat(w.saturating_sub(c.chars().count()));
                match align {
                    Align::Left => {
                        s.push_str(c);
                        s.push_str(&pad);
                    }
                    Align::Right => {
                        s.push_str(&pad);
                        s.push_str(c);
                    }
                }
            }
            s.truncate(s.trim_end().len());
            s.push('\n');
            s
        };
        let mut out = line(&mut self.columns.iter().map(|(h, _)| h.as_str()));
        out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1)));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(&mut r.iter().map(String::as_str)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&[("name", Align::Left), ("n", Align::Right)]);
        t.push(vec!["a".into(), "10".into()]);
        t.push(vec!["bbb".into(), "2".into()]);
        assert_eq!(t.render(), "name   n\n--------\na     10\nbbb    2\n");
    }

    #[test]
    fn long_cells_are_shortened_in_the_middle_and_escaped() {
        let long = format!("start.{}.end\x1b", "x".repeat(70_000));
        let mut t = Table::new(&[("name", Align::Left), ("n", Align::Right)]);
        t.push(vec![long, "1".into()]);
        let r = t.render();
        let row = r.lines().nth(2).unwrap();
        let cell = row.split("  ").next().unwrap();
        assert_eq!(cell.chars().count(), MAX_CELL);
        assert!(cell.starts_with("start.xx") && cell.ends_with("xx.end\\u{1b}") && cell.contains('…'), "{cell}");
        assert!(row.ends_with("  1"));
    }
}
