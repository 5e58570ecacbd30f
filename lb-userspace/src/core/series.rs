//! A recorded load series, as the Numenta Anomaly Benchmark stores them
//! (`testdata/nab/`: `timestamp,value` lines, an optional header line), parsed from
//! text. The predictor bench replays its series through the load model; the
//! simulator's and the testbed's S6 turn theirs into backends' capacity. Reading the
//! file is the caller's; the errors name it by the name the caller gives.

/// The values of one series, in file order, under the name it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Where it came from (a path or a file name), for reports and errors.
    pub name: String,
    pub values: Vec<f64>,
}

/// Why a series was refused: the file (as named by the caller) and, for a bad
/// line, its number (from 1).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SeriesError {
    #[error("{name}:{line}: expected `timestamp,value`, got {text:?}")]
    NotTwoFields {
        name: String,
        line: usize,
        text: String,
    },
    #[error("{name}:{line}: the timestamp is empty")]
    NoTimestamp { name: String, line: usize },
    #[error("{name}:{line}: value {value:?} is not a number")]
    NotANumber {
        name: String,
        line: usize,
        value: String,
    },
    #[error("{name}:{line}: value {value:?} is not finite")]
    NotFinite {
        name: String,
        line: usize,
        value: String,
    },
    #[error("{name}: {found} values, at least {needed} are needed")]
    TooShort {
        name: String,
        found: usize,
        needed: usize,
    },
}

impl Series {
    /// Parses `text`, the content of the file called `name`: one `timestamp,value`
    /// per line, blank lines skipped, a first line whose value is not a number taken
    /// as the header. At least `needed` values are required.
    pub fn parse(name: &str, text: &str, needed: usize) -> Result<Series, SeriesError> {
        let mut values = Vec::new();
        let mut seen_line = false;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let first = !seen_line;
            seen_line = true;
            let line_no = i + 1;
            let Some((timestamp, value)) = line.split_once(',').filter(|(_, v)| !v.contains(','))
            else {
                return Err(SeriesError::NotTwoFields {
                    name: name.to_owned(),
                    line: line_no,
                    text: line.to_owned(),
                });
            };
            let value = value.trim();
            match value.parse::<f64>() {
                // A first line whose value is not a number is the header.
                Err(_) if first => {}
                Err(_) => {
                    return Err(SeriesError::NotANumber {
                        name: name.to_owned(),
                        line: line_no,
                        value: value.to_owned(),
                    });
                }
                Ok(_) if timestamp.trim().is_empty() => {
                    return Err(SeriesError::NoTimestamp {
                        name: name.to_owned(),
                        line: line_no,
                    });
                }
                Ok(v) if !v.is_finite() => {
                    return Err(SeriesError::NotFinite {
                        name: name.to_owned(),
                        line: line_no,
                        value: value.to_owned(),
                    });
                }
                Ok(v) => values.push(v),
            }
        }
        if values.len() < needed {
            return Err(SeriesError::TooShort {
                name: name.to_owned(),
                found: values.len(),
                needed,
            });
        }
        Ok(Series {
            name: name.to_owned(),
            values,
        })
    }

    /// `len` consecutive values starting at the fraction `start` (0..1) of the
    /// series, as far as the series lets such a window start: 0 is its beginning, 1
    /// the last window that fits. A series shorter than `len` is read around from its
    /// beginning again.
    pub fn window(&self, start: f64, len: usize) -> Vec<f64> {
        let n = self.values.len();
        if n == 0 {
            return Vec::new();
        }
        let room = n.saturating_sub(len);
        let from = (start.clamp(0.0, 1.0) * room as f64).round() as usize;
        (0..len).map(|k| self.values[(from + k) % n]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_nab_file_with_its_header() {
        let text = "timestamp,value\n2014-02-14 14:30:00,0.132\n\n2014-02-14 14:35:00, 7.5\n";
        let s = Series::parse("a.csv", text, 2).unwrap();
        assert_eq!(s.values, vec![0.132, 7.5]);
        assert_eq!(s.name, "a.csv");
        // Without a header too.
        let s = Series::parse("b.csv", "t1,1\nt2,2\n", 1).unwrap();
        assert_eq!(s.values, vec![1.0, 2.0]);
    }

    #[test]
    fn a_bad_line_is_named_with_its_file_and_number() {
        let text = "timestamp,value\nt1,1\nt2,oops\n";
        let e = Series::parse("cpu.csv", text, 1).unwrap_err();
        assert_eq!(
            e,
            SeriesError::NotANumber {
                name: "cpu.csv".into(),
                line: 3,
                value: "oops".into()
            }
        );
        assert_eq!(e.to_string(), "cpu.csv:3: value \"oops\" is not a number");
        let e = Series::parse("cpu.csv", "t1,1\nt2,3,4\n", 1).unwrap_err();
        assert!(
            matches!(e, SeriesError::NotTwoFields { line: 2, .. }),
            "{e:?}"
        );
        let e = Series::parse("cpu.csv", "t1,1\nt2\n", 1).unwrap_err();
        assert!(
            matches!(e, SeriesError::NotTwoFields { line: 2, .. }),
            "{e:?}"
        );
        let e = Series::parse("cpu.csv", "t1,1\n,2\n", 1).unwrap_err();
        assert!(
            matches!(e, SeriesError::NoTimestamp { line: 2, .. }),
            "{e:?}"
        );
        let e = Series::parse("cpu.csv", "t1,1\nt2,inf\n", 1).unwrap_err();
        assert!(matches!(e, SeriesError::NotFinite { line: 2, .. }), "{e:?}");
    }

    #[test]
    fn a_short_series_is_refused() {
        let e = Series::parse("short.csv", "timestamp,value\nt1,1\nt2,2\n", 3).unwrap_err();
        assert_eq!(
            e,
            SeriesError::TooShort {
                name: "short.csv".into(),
                found: 2,
                needed: 3
            }
        );
        assert_eq!(e.to_string(), "short.csv: 2 values, at least 3 are needed");
    }

    #[test]
    fn windows_start_at_a_fraction_of_the_room() {
        let s = Series {
            name: "x".into(),
            values: (0..10).map(f64::from).collect(),
        };
        assert_eq!(s.window(0.0, 3), vec![0.0, 1.0, 2.0]);
        assert_eq!(s.window(1.0, 3), vec![7.0, 8.0, 9.0]);
        assert_eq!(s.window(0.5, 4), vec![3.0, 4.0, 5.0, 6.0]);
        // Longer than the series: around again.
        assert_eq!(s.window(0.0, 12)[10..], [0.0, 1.0]);
    }
}
