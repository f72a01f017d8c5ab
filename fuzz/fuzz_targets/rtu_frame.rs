//! The RTU frame parser on arbitrary bytes: never panics; whatever it
//! accepts is exactly one well-formed frame of the size its function
//! implies, whose PDU is written back byte for byte; and the reply scanner
//! never panics on any line content.
#![no_main]

use fieldgate::modbus::rtu::{adu, find_reply, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((unit, request)) = parse_request(data) {
        assert_eq!(request.frame_sizes().0, data.len(), "{request:?}");
        assert_eq!(adu(unit.get(), &request.pdu()), data, "{request:?}");
        let _ = find_reply(data, unit.get(), &request);
        let _ = request.decode_reply(&data[1..data.len() - 2]);
    }
});
