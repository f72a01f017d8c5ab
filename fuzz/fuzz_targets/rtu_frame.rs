//! The RTU frame parser on arbitrary bytes: never panics; whatever it
//! accepts is exactly one well-formed frame of the size its function implies,
//! and a response can be built for it.
#![no_main]

use fieldgate::bus::frame::{parse_request, response_frame};
use fieldgate::bus::{Reply, TxError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((unit, request)) = parse_request(data) {
        assert_eq!(request.frame_sizes().0, data.len(), "{request:?}");
        for outcome in [Ok(Reply::Written), Err(TxError::Timeout(Default::default()))] {
            let _ = response_frame(unit, &request, &outcome);
        }
    }
});
