//! Converting headers between hyper's maps and the ordered maps Proxy-Wasm
//! plugins see, both ways, as Envoy presents them: pseudo-headers first,
//! `host` folded into `:authority`, hop-by-hop headers dropped.
//!
//! Every proxied request converts its request and response headers once in
//! each direction, so the conversions avoid an allocation per header: going
//! back to hyper, all values of a plugin map are copied once into one shared
//! buffer and every [`HeaderValue`] (and the request URI) is a slice of it.

use std::ops::Range;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use wisp_wasm_host::HeaderMap;

use crate::header_pool;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `name`'s index in [`HOP_BY_HOP`]. A `match` on the string is a length
/// switch and one comparison, where comparing `HeaderName`s one by one was
/// a visible part of every conversion.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authenticate" => Some(3),
        "proxy-authorization" => Some(4),
        "te" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_index(name).is_some()
}

/// Which hop-by-hop headers a map holds (bit i: `HOP_BY_HOP[i]`), and
/// whether they all come after every other header.
#[derive(Clone, Copy)]
struct HopByHop {
    present: u8,
    trailing: bool,
}

impl HopByHop {
    fn new() -> HopByHop {
        HopByHop {
            present: 0,
            trailing: true,
        }
    }

    /// Notes the next header name; whether it is hop-by-hop.
    fn note(&mut self, name: &HeaderName) -> bool {
        match hop_by_hop_index(name) {
            Some(i) => {
                self.present |= 1 << i;
                true
            }
            None => {
                if self.present != 0 {
                    self.trailing = false;
                }
                false
            }
        }
    }

    /// `headers` without them, the others in their order.
    fn strip(self, mut headers: http::HeaderMap) -> http::HeaderMap {
        if self.present == 0 {
            return headers;
        }
        if !self.trailing {
            return without_hop_by_hop(headers);
        }
        // `remove` moves the last entry into the gap; with only hop-by-hop
        // headers after the first one, that never reorders the others.
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if self.present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
        headers
    }
}

/// Room for the entries plugins typically add, so adding one does not
/// regrow the map.
const ADDED_ENTRIES: usize = 2;

/// The request headers as Proxy-Wasm plugins see them in Envoy.
pub fn request_header_map(parts: &http::request::Parts, tls: bool) -> HeaderMap {
    let authority = parts
        .headers
        .get(header::HOST)
        .map(HeaderValue::as_bytes)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut map = header_pool::take(parts.headers.len() + 4 + ADDED_ENTRIES);
    map.add_lowercase(":authority", authority);
    map.add_lowercase(":path", path.as_bytes());
    map.add_lowercase(":method", parts.method.as_str().as_bytes());
    map.add_lowercase(":scheme", if tls { b"https" } else { b"http" });
    for (name, value) in &parts.headers {
        if name == header::TE {
            // `te: trailers` is end to end in practice (gRPC needs it), as
            // Envoy keeps it; other TE values describe this hop only.
            if value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|v| v.trim_ascii() == b"trailers")
            {
                map.add_lowercase("te", b"trailers");
            }
        } else if name != header::HOST && !is_hop_by_hop(name) {
            map.add_lowercase(name.as_str(), value.as_bytes());
        }
    }
    map
}

/// The response headers as plugins see them: `:status` first.
pub fn response_header_map(status: StatusCode, headers: &http::HeaderMap) -> HeaderMap {
    response_map(status, headers).0
}

/// The plugins' view of the response headers, and the hop-by-hop ones
/// left out of it.
fn response_map(status: StatusCode, headers: &http::HeaderMap) -> (HeaderMap, HopByHop) {
    let mut map = header_pool::take(headers.len() + 1 + ADDED_ENTRIES);
    map.add_lowercase(":status", status.as_str().as_bytes());
    let mut hop_by_hop = HopByHop::new();
    for (name, value) in headers {
        if !hop_by_hop.note(name) {
            map.add_lowercase(name.as_str(), value.as_bytes());
        }
    }
    map.mark_untouched();
    (map, hop_by_hop)
}

/// The response headers as the upstream sent them, kept while the plugins
/// run. Most plugins leave them alone or only add some; the response then
/// goes out with these plus what was appended, instead of every header being
/// converted back (see [`build_response_reusing`]).
pub struct OriginalHeaders {
    headers: http::HeaderMap,
    /// Entries of the plugin map built from them, `:status` included.
    entries: usize,
    /// The hop-by-hop headers left out of the plugin map.
    hop_by_hop: HopByHop,
}

/// [`response_header_map`], keeping `headers` for [`build_response_reusing`].
pub fn response_header_map_keeping(
    status: StatusCode,
    headers: http::HeaderMap,
) -> (HeaderMap, OriginalHeaders) {
    let (map, hop_by_hop) = response_map(status, &headers);
    let original = OriginalHeaders {
        entries: map.len(),
        hop_by_hop,
        headers,
    };
    (map, original)
}

/// http trailers as the plugins see them.
pub fn to_wasm_map(map: &http::HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(map.len());
    for (name, value) in map {
        out.add_lowercase(name.as_str(), value.as_bytes());
    }
    out
}

/// The plugins' trailers as http trailers; invalid ones are dropped.
pub fn to_http_map(map: &HeaderMap) -> http::HeaderMap {
    let values = SharedValues::new(map);
    let mut out = http::HeaderMap::with_capacity(map.len());
    values.append_valid(&mut out, "trailer");
    out
}

/// Builds the upstream request from the headers the filter chain left,
/// for `destination` in the downstream's HTTP version.
pub fn upstream_request<B>(
    headers: &HeaderMap,
    destination: std::net::SocketAddr,
    version: Version,
    body: B,
) -> Result<Request<B>, String> {
    let values = SharedValues::new(headers);
    let pseudo = |name: &str| {
        values
            .pseudo(name)
            .ok_or_else(|| format!("the request lost its {name} pseudo-header"))
    };
    let method =
        http::Method::from_bytes(&pseudo(":method")?).map_err(|e| format!(":method: {e}"))?;
    let path = pseudo(":path")?;
    let path_str = std::str::from_utf8(&path).map_err(|e| format!(":path: {e}"))?;
    if !path_str.starts_with('/') && path_str != "*" {
        return Err(format!(":path {path_str:?} is not an origin-form path"));
    }
    let authority = pseudo(":authority")?;
    let authority_str = std::str::from_utf8(&authority).map_err(|e| format!(":authority: {e}"))?;

    let mut host = None;
    let uri = if version == Version::HTTP_2 {
        // HTTP/2 carries the authority in the URI (:authority); the
        // connection itself goes to `destination` (see upstream.rs).
        let authority = if authority_str.is_empty() {
            destination.to_string()
        } else {
            authority_str.to_owned()
        };
        Uri::try_from(format!("http://{authority}{path_str}"))
    } else {
        // HTTP/1.1: origin form; the authority travels as Host.
        if !authority.is_empty() {
            host = Some(
                HeaderValue::from_maybe_shared(authority)
                    .map_err(|e| format!(":authority: {e}"))?,
            );
        }
        Uri::from_maybe_shared(path)
    }
    .map_err(|e| format!(":path: {e}"))?;

    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.version_mut() = version;
    *request.uri_mut() = uri;
    let out = request.headers_mut();
    out.reserve(headers.len());
    if let Some(host) = host {
        // First on the wire, as a client would send it.
        out.insert(header::HOST, host);
    }
    for (name, value) in values.regular() {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name:?}: {e}"))?;
        let value = value.map_err(|e| format!("header {name}: {e}"))?;
        out.append(name, value);
    }
    Ok(request)
}

/// Builds the downstream response from the headers the filter chain left;
/// `status` unless a plugin set a valid `:status`. Headers that are not
/// valid HTTP are dropped with a warning.
pub fn build_response<B>(status: StatusCode, headers: &HeaderMap, body: B) -> Response<B> {
    let values = SharedValues::new(headers);
    let status = values
        .pseudo(":status")
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(status);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let out = response.headers_mut();
    out.reserve(headers.len());
    values.append_valid(out, "response header");
    response
}

/// [`build_response`] for a map made by [`response_header_map_keeping`]:
/// while no plugin replaced or removed any of the upstream's headers (nor
/// `:status`), those are kept as they are and only the entries appended
/// after them are converted. The result is the same either way.
pub fn build_response_reusing<B>(
    status: StatusCode,
    headers: &HeaderMap,
    original: OriginalHeaders,
    body: B,
) -> Response<B> {
    if headers.untouched() < original.entries {
        return build_response(status, headers, body);
    }
    let mut out = original.hop_by_hop.strip(original.headers);
    for (name, value) in headers.iter_from(original.entries) {
        // A pseudo-header appended later never wins over the first one.
        if !name.starts_with(':') {
            append_or_warn(
                &mut out,
                name,
                HeaderValue::from_bytes(value),
                "response header",
            );
        }
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = out;
    response
}

/// `headers` without the hop-by-hop ones, in their order (`remove` would
/// move the last header into the gap). Names and values are moved, not
/// parsed again.
fn without_hop_by_hop(headers: http::HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(headers.len());
    let mut current: Option<HeaderName> = None;
    // `into_iter` names only the first value of each name.
    for (name, value) in headers {
        if let Some(name) = name {
            current = (!is_hop_by_hop(&name)).then_some(name);
        }
        if let Some(name) = &current {
            out.append(name, value);
        }
    }
    out
}

/// Appends `name: value` to `out`, or drops it with a warning naming it as a
/// `what` when it is not valid HTTP.
fn append_or_warn(
    out: &mut http::HeaderMap,
    name: &str,
    value: Result<HeaderValue, header::InvalidHeaderValue>,
    what: &str,
) {
    match (HeaderName::from_bytes(name.as_bytes()), value) {
        (Ok(name), Ok(value)) => {
            out.append(name, value);
        }
        _ => tracing::warn!(header = name, "dropping a {what} that is not valid HTTP"),
    }
}

/// A plugin header map's values copied once into one shared buffer.
struct SharedValues<'a> {
    map: &'a HeaderMap,
    buffer: Bytes,
}

impl<'a> SharedValues<'a> {
    fn new(map: &'a HeaderMap) -> Self {
        SharedValues {
            map,
            buffer: Bytes::copy_from_slice(map.value_buffer()),
        }
    }

    fn entries(&self) -> impl Iterator<Item = (&'a str, Range<usize>)> + use<'a> {
        self.map.value_ranges()
    }

    /// The first value of pseudo-header `name` (names are stored lower-case).
    fn pseudo(&self, name: &str) -> Option<Bytes> {
        self.entries()
            .find(|(n, _)| *n == name)
            .map(|(_, range)| self.buffer.slice(range))
    }

    /// The entries that are not pseudo-headers, values as [`HeaderValue`]s
    /// sharing the buffer.
    fn regular(
        &self,
    ) -> impl Iterator<Item = (&'a str, Result<HeaderValue, header::InvalidHeaderValue>)> + '_ {
        self.entries()
            .filter(|(name, _)| !name.starts_with(':'))
            .map(|(name, range)| {
                (
                    name,
                    HeaderValue::from_maybe_shared(self.buffer.slice(range)),
                )
            })
    }

    /// Appends the regular entries to `out`; one that is not valid HTTP is
    /// dropped with a warning naming it as a `what`.
    fn append_valid(&self, out: &mut http::HeaderMap, what: &str) {
        for (name, value) in self.regular() {
            append_or_warn(out, name, value, what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        map.iter()
            .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    fn http_pairs(map: &http::HeaderMap) -> Vec<(String, String)> {
        map.iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn request_headers_get_pseudo_headers_first_and_lose_hop_by_hop_ones() {
        let request = Request::builder()
            .method("POST")
            .uri("/a?b=c")
            .header("Host", "example.test")
            .header("Connection", "keep-alive")
            .header("TE", "gzip, trailers")
            .header("X-Custom", "1")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let expected = [
            (":authority", "example.test"),
            (":path", "/a?b=c"),
            (":method", "POST"),
            (":scheme", "https"),
            ("te", "trailers"),
            ("x-custom", "1"),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs(&request_header_map(&parts, true)), expected);
    }

    #[test]
    fn an_http1_upstream_request_is_origin_form_with_host_first() {
        let mut headers: HeaderMap = [
            ("x-before", "0"),
            (":authority", "svc.test:8080"),
            (":path", "/p?q=1"),
            (":method", "PUT"),
            (":scheme", "http"),
            ("x-after", "1"),
        ]
        .into_iter()
        .collect();
        headers.replace("x-before", b"replaced value");
        let addr = "10.0.0.1:80".parse().unwrap();
        let request = upstream_request(&headers, addr, Version::HTTP_11, ()).unwrap();
        assert_eq!(request.method(), http::Method::PUT);
        assert_eq!(request.uri(), "/p?q=1");
        assert_eq!(
            http_pairs(request.headers()),
            [
                ("host".to_owned(), "svc.test:8080".to_owned()),
                ("x-before".to_owned(), "replaced value".to_owned()),
                ("x-after".to_owned(), "1".to_owned()),
            ]
        );
    }

    #[test]
    fn an_http2_upstream_request_carries_the_authority_in_its_uri() {
        let headers: HeaderMap = [(":authority", ""), (":path", "/x"), (":method", "GET")]
            .into_iter()
            .collect();
        let addr = "10.0.0.1:80".parse().unwrap();
        let request = upstream_request(&headers, addr, Version::HTTP_2, ()).unwrap();
        assert_eq!(request.uri(), "http://10.0.0.1:80/x");
        assert!(request.headers().is_empty());
    }

    #[test]
    fn a_request_the_plugins_broke_is_refused_with_the_reason() {
        let base = [(":authority", "a"), (":path", "/"), (":method", "GET")];
        let broken = |edit: &dyn Fn(&mut HeaderMap)| {
            let mut headers: HeaderMap = base.into_iter().collect();
            edit(&mut headers);
            upstream_request(
                &headers,
                "10.0.0.1:80".parse().unwrap(),
                Version::HTTP_11,
                (),
            )
            .unwrap_err()
        };
        assert!(broken(&|h| h.remove(":path")).contains("lost its :path"));
        assert!(broken(&|h| h.replace(":path", b"no-slash")).contains("origin-form"));
        assert!(broken(&|h| h.replace(":method", b"G T")).contains(":method"));
        assert!(broken(&|h| h.add("x-bad", b"a\nb")).contains("header x-bad"));
        assert!(broken(&|h| h.add("bad name", b"v")).contains("header \"bad name\""));
    }

    #[test]
    fn a_response_takes_the_plugins_status_and_drops_invalid_headers() {
        let headers: HeaderMap = [
            (":status", "418"),
            ("x-ok", "yes"),
            ("x-bad", "a\nb"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]
        .into_iter()
        .collect();
        let response = build_response(StatusCode::OK, &headers, ());
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(
            http_pairs(response.headers()),
            [
                ("x-ok".to_owned(), "yes".to_owned()),
                ("set-cookie".to_owned(), "a=1".to_owned()),
                ("set-cookie".to_owned(), "b=2".to_owned()),
            ]
        );
        let no_status: HeaderMap = [(":status", "abc")].into_iter().collect();
        assert_eq!(
            build_response(StatusCode::BAD_GATEWAY, &no_status, ()).status(),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn response_and_trailer_maps_round_trip() {
        let mut http = http::HeaderMap::new();
        http.append("content-type", HeaderValue::from_static("text/plain"));
        http.append("transfer-encoding", HeaderValue::from_static("chunked"));
        http.append("grpc-status", HeaderValue::from_static("0"));
        let map = response_header_map(StatusCode::NOT_FOUND, &http);
        assert_eq!(
            pairs(&map),
            [
                (":status".to_owned(), "404".to_owned()),
                ("content-type".to_owned(), "text/plain".to_owned()),
                ("grpc-status".to_owned(), "0".to_owned()),
            ]
        );
        let trailers = to_wasm_map(&http);
        assert_eq!(to_http_map(&trailers), http);
    }

    #[test]
    fn the_hop_by_hop_match_and_list_agree() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::HOST), None);
    }

    #[test]
    fn reusing_the_upstream_headers_gives_the_rebuilt_response() {
        let mut upstream = http::HeaderMap::new();
        upstream.append("content-type", HeaderValue::from_static("text/plain"));
        upstream.append("connection", HeaderValue::from_static("keep-alive"));
        upstream.append("set-cookie", HeaderValue::from_static("a=1"));
        upstream.append("content-length", HeaderValue::from_static("5"));
        // What plugins may do, and whether the upstream's map can be kept.
        type Edit<'a> = (&'a str, &'a dyn Fn(&mut HeaderMap), bool);
        let edits: [Edit; 6] = [
            ("nothing", &|_| {}, true),
            ("append", &|m| m.add("x-wisp-filter", b"on"), true),
            ("append to a name", &|m| m.add("set-cookie", b"b=2"), true),
            (
                "append a pseudo-header",
                &|m| m.add(":status", b"500"),
                true,
            ),
            (
                "replace",
                &|m| m.replace("content-type", b"text/html"),
                false,
            ),
            ("remove", &|m| m.remove("set-cookie"), false),
        ];
        for (what, edit, kept) in edits {
            let (mut map, original) =
                response_header_map_keeping(StatusCode::CREATED, upstream.clone());
            edit(&mut map);
            assert_eq!(map.untouched() == original.entries, kept, "{what}");
            let rebuilt = build_response(StatusCode::CREATED, &map, ());
            let reused = build_response_reusing(StatusCode::CREATED, &map, original, ());
            assert_eq!(reused.status(), rebuilt.status(), "{what}");
            assert_eq!(
                http_pairs(reused.headers()),
                http_pairs(rebuilt.headers()),
                "{what}: same headers in the same order"
            );
            assert!(!reused.headers().contains_key("connection"), "{what}");
        }
        // Hop-by-hop headers are stripped without reordering the others,
        // among them (rebuilt) or all after them (removed in place).
        let layouts: [&[(&'static str, &'static str)]; 2] = [
            &[
                ("keep-alive", "timeout=5"),
                ("server", "nginx"),
                ("connection", "keep-alive"),
                ("date", "today"),
                ("x-last", "1"),
            ],
            &[
                ("server", "nginx"),
                ("date", "today"),
                ("x-last", "1"),
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
            ],
        ];
        for layout in layouts {
            let mut headers = http::HeaderMap::new();
            for &(name, value) in layout {
                headers.append(name, HeaderValue::from_static(value));
            }
            let (map, original) = response_header_map_keeping(StatusCode::OK, headers);
            let reused = build_response_reusing(StatusCode::OK, &map, original, ());
            let expected = [("server", "nginx"), ("date", "today"), ("x-last", "1")]
                .map(|(n, v)| (n.to_owned(), v.to_owned()));
            assert_eq!(http_pairs(reused.headers()), expected, "{layout:?}");
        }

        let (mut map, original) = response_header_map_keeping(StatusCode::OK, upstream);
        map.replace(":status", b"418");
        let response = build_response_reusing(StatusCode::OK, &map, original, ());
        assert_eq!(
            response.status(),
            StatusCode::IM_A_TEAPOT,
            "a new :status is rebuilt"
        );
    }
}
