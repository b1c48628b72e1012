"""``iwm-finetune RUN_DIR --protocol {predictor,encoder,probe}``: IWM's downstream protocols on a pretrained run."""
import argparse
import logging
import sys

from .run import PREDICTOR_INITS, PROTOCOLS, FinetuneArgs


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="iwm-finetune",
        description="Fine-tune a pretrained IWM / I-JEPA run for classification and write "
                    "RUN_DIR/finetune_<protocol>.json (accuracy, protocol, trainable_params, seconds). "
                    "predictor: frozen target encoder, the pretrained predictor (identity action) + a head; "
                    "encoder: the target encoder + a head; probe: the linear probe of iwm-eval. "
                    "Interrupted runs resume from RUN_DIR/finetune_<protocol>/checkpoints.")
    parser.add_argument("run_dir")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="predictor")
    parser.add_argument("--epochs", type=int, default=FinetuneArgs.epochs)
    parser.add_argument("--lr", type=float, default=FinetuneArgs.lr, help="peak learning rate (AdamW, cosine)")
    parser.add_argument("--batch-size", type=int, default=FinetuneArgs.batch_size, help="global batch")
    parser.add_argument("--seed", type=int, default=FinetuneArgs.seed)
    parser.add_argument("--weight-decay", type=float, default=FinetuneArgs.weight_decay)
    parser.add_argument("--predictor-init", choices=PREDICTOR_INITS, default="pretrained",
                        help="random: the same predictor architecture from scratch (the paper's control); "
                             "writes finetune_predictor_random.json")
    parser.add_argument("--data-root", default="",
                        help="fine-tune on this image folder (class subfolders) instead of the run's own data")
    a = parser.parse_args(argv)
    args = FinetuneArgs(protocol=a.protocol, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                        predictor_init=a.predictor_init, weight_decay=a.weight_decay, data_root=a.data_root)
    try:
        args.validate()
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="[iwm-fast] %(message)s", stream=sys.stderr)
    from ..train.cli import _user_errors
    from ..train.guard import NonFiniteLossError
    from .run import finetune_and_save

    try:
        results, path = finetune_and_save(a.run_dir, args)
    except NonFiniteLossError as e:
        logging.getLogger("iwm_fast").error("%s", e)
        return 3
    except (*_user_errors(), ValueError) as e:  # the usage is for argument errors only
        message = " ".join(str(e).split()) or type(e).__name__
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(f"{args.name}: accuracy {results['accuracy']:.4f}, trainable parameters {results['trainable_params']}, "
          f"{results['seconds']:.1f} s -> {path or 'not saved'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
