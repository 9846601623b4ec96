//! `wisp-header-filter`: a small Proxy-Wasm HTTP filter used by wisp's tests.
//!
//! * A request carrying `x-wisp-deny` gets a local `403` with the header
//!   `x-wisp-denied-by: <header_value>` and the body `denied by wisp header filter\n`.
//! * Every other response gets `x-wisp-filter: <header_value>`.
//!
//! `header_value` comes from the plugin configuration, a JSON object
//! `{"header_value": "..."}`; an empty configuration (or one without the key)
//! keeps [`DEFAULT_HEADER_VALUE`]. A configuration that is not such an object
//! is rejected (`on_configure` returns false), so hosts can test that path too.
//!
//! Built for `wasm32-wasip1` with `cargo xtask build-filters`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

/// Header value used when the plugin configuration does not set one.
pub const DEFAULT_HEADER_VALUE: &str = "wisp-header-filter";
/// A request with this header is denied.
const DENY_HEADER: &str = "x-wisp-deny";
/// Added to local 403 replies, naming the filter (its `header_value`).
const DENIED_BY_HEADER: &str = "x-wisp-denied-by";
/// Added to every response that passes through the filter.
const RESPONSE_HEADER: &str = "x-wisp-filter";
const DENY_BODY: &[u8] = b"denied by wisp header filter\n";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(FilterRoot { header_value: Rc::from(DEFAULT_HEADER_VALUE) })
    });
}}

/// The plugin configuration, as JSON.
#[derive(Deserialize)]
struct Config {
    header_value: Option<String>,
}

/// Parses the plugin configuration; `None` or empty bytes mean "use the default".
fn parse_config(bytes: Option<&[u8]>) -> Result<Rc<str>, serde_json::Error> {
    match bytes {
        Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
            let config: Config = serde_json::from_slice(bytes)?;
            Ok(Rc::from(
                config
                    .header_value
                    .as_deref()
                    .unwrap_or(DEFAULT_HEADER_VALUE),
            ))
        }
        _ => Ok(Rc::from(DEFAULT_HEADER_VALUE)),
    }
}

struct FilterRoot {
    header_value: Rc<str>,
}

impl Context for FilterRoot {}

impl RootContext for FilterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match parse_config(self.get_plugin_configuration().as_deref()) {
            Ok(header_value) => {
                log::info!("configured: header_value={header_value}");
                self.header_value = header_value;
                true
            }
            Err(err) => {
                log::error!("rejecting plugin configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HeaderFilter {
            context_id,
            header_value: Rc::clone(&self.header_value),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HeaderFilter {
    context_id: u32,
    header_value: Rc<str>,
}

impl Context for HeaderFilter {}

impl HttpContext for HeaderFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if self.get_http_request_header(DENY_HEADER).is_some() {
            log::info!(
                "#{} deny {path}: request carries {DENY_HEADER}",
                self.context_id
            );
            self.send_http_response(
                403,
                vec![(DENIED_BY_HEADER, &self.header_value)],
                Some(DENY_BODY),
            );
            return Action::Pause;
        }
        log::info!("#{} allow {path}", self.context_id);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        log::info!("#{} tag response with {RESPONSE_HEADER}", self.context_id);
        self.add_http_response_header(RESPONSE_HEADER, &self.header_value);
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_missing_configuration_uses_the_default() {
        assert_eq!(&*parse_config(None).unwrap(), DEFAULT_HEADER_VALUE);
        assert_eq!(&*parse_config(Some(b"")).unwrap(), DEFAULT_HEADER_VALUE);
        assert_eq!(&*parse_config(Some(b" \n")).unwrap(), DEFAULT_HEADER_VALUE);
        assert_eq!(&*parse_config(Some(b"{}")).unwrap(), DEFAULT_HEADER_VALUE);
    }

    #[test]
    fn configuration_sets_the_header_value() {
        let value = parse_config(Some(br#"{"header_value": "blue"}"#)).unwrap();
        assert_eq!(&*value, "blue");
    }

    #[test]
    fn malformed_configuration_is_an_error() {
        assert!(parse_config(Some(b"not json")).is_err());
        assert!(parse_config(Some(br#"{"header_value": 7}"#)).is_err());
    }
}
