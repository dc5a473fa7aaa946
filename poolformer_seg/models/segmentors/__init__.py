from .rowwise_encoder_decoder import (FullLogitsSegTTAModel,
                                      RowwiseEncoderDecoder, resized_argmax)

__all__ = ['RowwiseEncoderDecoder', 'FullLogitsSegTTAModel', 'resized_argmax']
