//! The codec every generated service and client of `bt.v1` uses: prost's, except that a message
//! that does not decode is the caller's fault: `INVALID_ARGUMENT` naming the decode error, not
//! prost's `INTERNAL` (which would tell an operator the coordinator is broken, and a client to
//! retry).
use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct BtCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BtCodec<T, U> {
    fn default() -> Self {
        BtCodec(PhantomData)
    }
}

impl<T, U> Codec for BtCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BtDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BtDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// [`ProstDecoder`] whose decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct BtDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for BtDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!("malformed message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
