//! Proxy-Wasm ABI constants: versions, status codes and the enums hostcalls take.
//!
//! Integer values follow the spec (`proxy-wasm/spec`, v0.2.1 §Types); every enum
//! converts from the raw `i32` a guest passes and rejects unknown values, which
//! hostcalls turn into `BAD_ARGUMENT` as cpp-host does.

use std::fmt;

/// The Proxy-Wasm ABI version a module declares through its marker export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_1_0`: 2-argument header callbacks, `OK` + empty
    /// value for a missing header.
    V0_1_0,
    /// `proxy_abi_version_0_2_0`: adds `end_of_stream` to header callbacks,
    /// `proxy_continue_stream`, `proxy_close_stream`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1`: adds `proxy_get_log_level`.
    V0_2_1,
}

impl AbiVersion {
    /// Finds the version declared by a module's exports (function exports in
    /// module order; the first marker wins, as in cpp-host's
    /// `BytecodeUtil::getAbiVersion`).
    pub fn from_function_exports<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        names.into_iter().find_map(Self::from_marker)
    }

    /// The version for one marker export name.
    pub fn from_marker(name: &str) -> Option<Self> {
        match name {
            "proxy_abi_version_0_1_0" => Some(Self::V0_1_0),
            "proxy_abi_version_0_2_0" => Some(Self::V0_2_0),
            "proxy_abi_version_0_2_1" => Some(Self::V0_2_1),
            _ => None,
        }
    }

    /// The marker export name of this version.
    pub fn marker(self) -> &'static str {
        match self {
            Self::V0_1_0 => "proxy_abi_version_0_1_0",
            Self::V0_2_0 => "proxy_abi_version_0_2_0",
            Self::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }

    /// Whether header callbacks take the third `end_of_stream` argument.
    pub fn header_callbacks_have_end_of_stream(self) -> bool {
        self >= Self::V0_2_0
    }
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V0_1_0 => "0.1.0",
            Self::V0_2_0 => "0.2.0",
            Self::V0_2_1 => "0.2.1",
        })
    }
}

/// `proxy_status_t`, what every `env.proxy_*` hostcall returns.
///
/// The Rust SDK knows only 0, 1, 2, 3, 4, 7, 8 and 10 and traps on anything it
/// does not expect, so hostcalls must return exactly what cpp-host returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

impl Status {
    /// The raw value handed back to the guest.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Declares a `#[repr(i32)]` enum whose raw guest values are checked on the way in.
macro_rules! abi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl TryFrom<i32> for $name {
            /// The rejected raw value.
            type Error = i32;

            fn try_from(raw: i32) -> Result<Self, i32> {
                match raw {
                    $($value => Ok(Self::$variant),)+
                    other => Err(other),
                }
            }
        }
    };
}

abi_enum! {
    /// `proxy_log_level_t`.
    LogLevel {
        Trace = 0,
        Debug = 1,
        Info = 2,
        Warn = 3,
        Error = 4,
        Critical = 5,
    }
}

abi_enum! {
    /// `proxy_map_type_t`: the header maps a guest can address.
    MapType {
        HttpRequestHeaders = 0,
        HttpRequestTrailers = 1,
        HttpResponseHeaders = 2,
        HttpResponseTrailers = 3,
        GrpcCallInitialMetadata = 4,
        GrpcCallTrailingMetadata = 5,
        HttpCallResponseHeaders = 6,
        HttpCallResponseTrailers = 7,
    }
}

abi_enum! {
    /// `proxy_buffer_type_t`: the byte buffers a guest can address.
    BufferType {
        HttpRequestBody = 0,
        HttpResponseBody = 1,
        DownstreamData = 2,
        UpstreamData = 3,
        HttpCallResponseBody = 4,
        GrpcCallMessage = 5,
        VmConfiguration = 6,
        PluginConfiguration = 7,
        ForeignFunctionArguments = 8,
    }
}

abi_enum! {
    /// `proxy_stream_type_t`, argument of `proxy_continue_stream` / `proxy_close_stream`.
    StreamType {
        HttpRequest = 0,
        HttpResponse = 1,
        Downstream = 2,
        Upstream = 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_detection_takes_the_first_marker() {
        let exports = [
            "memory",
            "proxy_abi_version_0_2_0",
            "proxy_abi_version_0_2_1",
        ];
        assert_eq!(
            AbiVersion::from_function_exports(exports),
            Some(AbiVersion::V0_2_0)
        );
        assert_eq!(
            AbiVersion::from_function_exports(["proxy_abi_version_0_x_x"]),
            None
        );
        for v in [AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1] {
            assert_eq!(AbiVersion::from_marker(v.marker()), Some(v));
        }
        assert!(!AbiVersion::V0_1_0.header_callbacks_have_end_of_stream());
        assert!(AbiVersion::V0_2_1.header_callbacks_have_end_of_stream());
        assert_eq!(AbiVersion::V0_2_1.to_string(), "0.2.1");
    }

    #[test]
    fn enums_reject_unknown_values() {
        assert_eq!(MapType::try_from(2), Ok(MapType::HttpResponseHeaders));
        assert_eq!(MapType::try_from(8), Err(8));
        assert_eq!(BufferType::try_from(7), Ok(BufferType::PluginConfiguration));
        assert_eq!(BufferType::try_from(-1), Err(-1));
        assert_eq!(LogLevel::try_from(6), Err(6));
        assert_eq!(StreamType::try_from(3), Ok(StreamType::Upstream));
        assert_eq!(Status::Unimplemented.code(), 12);
    }
}
