from .rowwise_encoder_decoder import RowwiseEncoderDecoder, resized_argmax

__all__ = ['RowwiseEncoderDecoder', 'resized_argmax']
